//! The bench's result: rows of blufio and floor figures with units, rendered as a Markdown
//! table and as JSON.

use std::fmt::Write as _;

use crate::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Bytes,
    /// Stored in bytes, shown in MiB.
    Mebibytes,
    Count,
    PerSecond,
    Millis,
    Micros,
}

impl Unit {
    pub(super) fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "B",
            Unit::Mebibytes => "MiB",
            Unit::Count => "count",
            Unit::PerSecond => "1/s",
            Unit::Millis => "ms",
            Unit::Micros => "µs",
        }
    }

    pub(super) fn format(self, value: f64) -> String {
        match self {
            Unit::Bytes | Unit::PerSecond => thousands(value.round() as u64),
            Unit::Mebibytes => format!("{:.2} MiB", value / (1024.0 * 1024.0)),
            Unit::Count => {
                if value.fract() == 0.0 {
                    format!("{value:.0}")
                } else {
                    format!("{value:.2}")
                }
            }
            Unit::Millis => format!("{value:.2} ms"),
            Unit::Micros => format!("{value:.1} µs"),
        }
    }
}

/// Formats 4019024 as `4,019,024`.
pub(super) fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Row {
    measure: String,
    unit: Unit,
    blufio: Option<f64>,
    floor: Option<f64>,
}

impl Row {
    /// blufio ÷ floor, when both exist.
    pub(super) fn ratio(&self) -> Option<f64> {
        match (self.blufio, self.floor) {
            (Some(blufio), Some(floor)) if floor != 0.0 => Some(blufio / floor),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub(super) struct Report {
    pub(super) mode: &'static str,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    pub(super) fn new(mode: &'static str) -> Report {
        Report {
            mode,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(super) fn push(
        &mut self,
        measure: &str,
        unit: Unit,
        blufio: Option<f64>,
        floor: Option<f64>,
    ) {
        self.rows.push(Row {
            measure: measure.to_owned(),
            unit,
            blufio,
            floor,
        });
    }

    pub(super) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// A Markdown table: measure, blufio, floor, blufio ÷ floor.
    pub(super) fn render_table(&self) -> String {
        let cell =
            |value: Option<f64>, unit: Unit| value.map_or("–".to_owned(), |v| unit.format(v));
        let mut lines = vec![[
            "measure".to_owned(),
            "blufio".to_owned(),
            "floor".to_owned(),
            "blufio ÷ floor".to_owned(),
        ]];
        for row in &self.rows {
            lines.push([
                row.measure.clone(),
                cell(row.blufio, row.unit),
                cell(row.floor, row.unit),
                row.ratio()
                    .map_or("–".to_owned(), |ratio| format!("{ratio:.2}×")),
            ]);
        }
        let mut widths = [0; 4];
        for line in &lines {
            for (width, text) in widths.iter_mut().zip(line) {
                *width = (*width).max(text.chars().count());
            }
        }
        let mut text = String::new();
        for (index, line) in lines.iter().enumerate() {
            text.push('|');
            for (column, (width, cell)) in widths.iter().zip(line).enumerate() {
                let pad = width - cell.chars().count();
                if column == 0 {
                    let _ = write!(text, " {cell}{} |", " ".repeat(pad));
                } else {
                    let _ = write!(text, " {}{cell} |", " ".repeat(pad));
                }
            }
            text.push('\n');
            if index == 0 {
                text.push('|');
                for (column, width) in widths.iter().enumerate() {
                    let dashes = "-".repeat(width + 1);
                    if column == 0 {
                        let _ = write!(text, "{dashes}-|");
                    } else {
                        let _ = write!(text, "{dashes}:|");
                    }
                }
                text.push('\n');
            }
        }
        for note in &self.notes {
            let _ = writeln!(text, "\n{note}");
        }
        text
    }

    /// The same numbers as JSON: `{"mode", "rows": [{"measure", "unit", "blufio", "floor",
    /// "ratio"}], "notes"}`; missing values are `null`.
    pub(super) fn render_json(&self) -> String {
        let number = |value: Option<f64>| match value {
            Some(value) if value.is_finite() => format!("{value}"),
            _ => "null".to_owned(),
        };
        let mut text = format!(
            "{{\n  \"mode\": {},\n  \"rows\": [\n",
            json::quote(self.mode)
        );
        for (index, row) in self.rows.iter().enumerate() {
            let _ = write!(
                text,
                "    {{\"measure\": {}, \"unit\": {}, \"blufio\": {}, \"floor\": {}, \"ratio\": {}}}",
                json::quote(&row.measure),
                json::quote(row.unit.name()),
                number(row.blufio),
                number(row.floor),
                number(row.ratio())
            );
            text.push_str(if index + 1 < self.rows.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        text.push_str("  ],\n  \"notes\": [");
        let notes: Vec<String> = self.notes.iter().map(|note| json::quote(note)).collect();
        text.push_str(&notes.join(", "));
        text.push_str("]\n}\n");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_units_ratios_and_gaps() {
        let mut report = Report::new("quick");
        report.push(
            "binary size",
            Unit::Bytes,
            Some(4_019_024.0),
            Some(2_332_976.0),
        );
        report.push(
            "idle VmRSS",
            Unit::Mebibytes,
            Some(7.5 * 1048576.0),
            Some(5.0 * 1048576.0),
        );
        report.push("messages", Unit::PerSecond, Some(24_000.0), None);
        report.note("a note".to_owned());
        let table = report.render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("| measure"), "{table}");
        assert!(lines[1].starts_with("|---"), "{table}");
        assert!(lines[2].contains("4,019,024") && lines[2].contains("2,332,976"));
        assert!(lines[2].contains("1.72×"), "{table}");
        assert!(lines[3].contains("7.50 MiB") && lines[3].contains("1.50×"));
        assert!(lines[4].contains("24,000") && lines[4].contains('–'));
        assert!(table.contains("a note"));
        // Every row is as wide as the header.
        let width = lines[0].chars().count();
        assert!(
            lines[..5].iter().all(|line| line.chars().count() == width),
            "{table}"
        );
    }

    #[test]
    fn json_has_the_same_numbers_and_nulls() {
        let mut report = Report::new("full");
        report.push("size \"x\"", Unit::Bytes, Some(4.0), Some(2.0));
        report.push("sessions", Unit::Bytes, Some(100.5), None);
        report.note("took 1 s".to_owned());
        let json = report.render_json();
        assert!(json.contains(r#""mode": "full""#), "{json}");
        assert!(json.contains(
            r#"{"measure": "size \"x\"", "unit": "B", "blufio": 4, "floor": 2, "ratio": 2}"#
        ));
        assert!(
            json.contains(r#""blufio": 100.5, "floor": null, "ratio": null"#),
            "{json}"
        );
        assert!(json.contains(r#""notes": ["took 1 s"]"#), "{json}");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4_019_024), "4,019,024");
    }
}
