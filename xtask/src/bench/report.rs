//! The bench's result: rows of blufio and baseline figures with units, in sections (the floor
//! for the footprint rows, the direct call to the fake upstream for the gateway rows), some
//! with a target printed beside them, rendered as Markdown tables and as JSON.

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

/// Which figure of a row a [`Target`] bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Figure {
    /// blufio's own figure.
    Blufio,
    /// blufio ÷ the baseline.
    Ratio,
}

/// The side of a bound a figure must be on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

/// A target from an issue, printed beside the row it judges (the bench fails on none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Target {
    pub(super) figure: Figure,
    pub(super) bound: Bound,
}

impl Target {
    pub(super) fn at_most(limit: f64) -> Target {
        Target {
            figure: Figure::Blufio,
            bound: Bound::AtMost(limit),
        }
    }

    pub(super) fn at_least(limit: f64) -> Target {
        Target {
            figure: Figure::Blufio,
            bound: Bound::AtLeast(limit),
        }
    }

    pub(super) fn ratio_at_least(limit: f64) -> Target {
        Target {
            figure: Figure::Ratio,
            bound: Bound::AtLeast(limit),
        }
    }

    /// The bound as text in the row's unit, such as `≤ 0.30 ms` or `≥ 0.40×`.
    pub(super) fn text(self, unit: Unit) -> String {
        let (sign, limit) = match self.bound {
            Bound::AtMost(limit) => ("≤", limit),
            Bound::AtLeast(limit) => ("≥", limit),
        };
        match self.figure {
            Figure::Blufio => format!("{sign} {}", unit.format(limit)),
            Figure::Ratio => format!("{sign} {limit:.2}×"),
        }
    }

    /// Whether the row meets it; `None` when the figure is missing.
    pub(super) fn met(self, row: &Row) -> Option<bool> {
        let value = match self.figure {
            Figure::Blufio => row.blufio,
            Figure::Ratio => row.ratio(),
        }?;
        Some(match self.bound {
            Bound::AtMost(limit) => value <= limit,
            Bound::AtLeast(limit) => value >= limit,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Row {
    measure: String,
    unit: Unit,
    blufio: Option<f64>,
    floor: Option<f64>,
    target: Option<Target>,
}

impl Row {
    /// blufio ÷ floor, when both exist.
    pub(super) fn ratio(&self) -> Option<f64> {
        match (self.blufio, self.floor) {
            (Some(blufio), Some(floor)) if floor != 0.0 => Some(blufio / floor),
            _ => None,
        }
    }

    /// The target cell: the bound and whether it is met.
    fn target_cell(&self) -> String {
        let Some(target) = self.target else {
            return String::new();
        };
        let verdict = match target.met(self) {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "no figure",
        };
        format!("{}: {verdict}", target.text(self.unit))
    }
}

/// Rows compared with one baseline, rendered as one table.
#[derive(Debug)]
struct Section {
    /// Printed above the table; the first section has none.
    title: Option<String>,
    /// The second column: `floor`, or `direct` for the gateway.
    baseline: &'static str,
    rows: Vec<Row>,
}

#[derive(Debug)]
pub(super) struct Report {
    pub(super) mode: &'static str,
    sections: Vec<Section>,
    notes: Vec<String>,
}

impl Report {
    pub(super) fn new(mode: &'static str) -> Report {
        Report {
            mode,
            sections: vec![Section {
                title: None,
                baseline: "floor",
                rows: Vec::new(),
            }],
            notes: Vec::new(),
        }
    }

    /// Starts a section: the rows pushed next are compared with `baseline`.
    pub(super) fn section(&mut self, title: &str, baseline: &'static str) {
        self.sections.push(Section {
            title: Some(title.to_owned()),
            baseline,
            rows: Vec::new(),
        });
    }

    pub(super) fn push(
        &mut self,
        measure: &str,
        unit: Unit,
        blufio: Option<f64>,
        floor: Option<f64>,
    ) {
        self.push_row(measure, unit, blufio, floor, None);
    }

    /// Pushes a row with a target printed beside it.
    pub(super) fn push_row(
        &mut self,
        measure: &str,
        unit: Unit,
        blufio: Option<f64>,
        floor: Option<f64>,
        target: Option<Target>,
    ) {
        let row = Row {
            measure: measure.to_owned(),
            unit,
            blufio,
            floor,
            target,
        };
        if let Some(section) = self.sections.last_mut() {
            section.rows.push(row);
        }
    }

    pub(super) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// One Markdown table per section: measure, blufio, the baseline, blufio ÷ baseline, and
    /// the target when a row of the section has one; then the notes.
    pub(super) fn render_table(&self) -> String {
        let mut text = String::new();
        for section in &self.sections {
            if section.rows.is_empty() {
                continue;
            }
            if let Some(title) = &section.title {
                let _ = writeln!(text, "\n### {title}\n");
            }
            render_section(section, &mut text);
        }
        for note in &self.notes {
            let _ = writeln!(text, "\n{note}");
        }
        text
    }

    /// The same numbers as JSON: `{"mode", "rows": [{"measure", "unit", "blufio", "floor",
    /// "ratio", "baseline", "target", "met"}], "notes"}`; `floor` holds the baseline's figure
    /// (named by `baseline`), and missing values are `null`.
    pub(super) fn render_json(&self) -> String {
        let number = |value: Option<f64>| match value {
            Some(value) if value.is_finite() => format!("{value}"),
            _ => "null".to_owned(),
        };
        let mut text = format!(
            "{{\n  \"mode\": {},\n  \"rows\": [\n",
            json::quote(self.mode)
        );
        let rows: Vec<(&Section, &Row)> = self
            .sections
            .iter()
            .flat_map(|section| section.rows.iter().map(move |row| (section, row)))
            .collect();
        for (index, (section, row)) in rows.iter().enumerate() {
            let target = row.target.map_or("null".to_owned(), |target| {
                json::quote(&target.text(row.unit))
            });
            let met = match row.target.and_then(|target| target.met(row)) {
                Some(met) => met.to_string(),
                None => "null".to_owned(),
            };
            let _ = write!(
                text,
                "    {{\"measure\": {}, \"unit\": {}, \"blufio\": {}, \"floor\": {}, \"ratio\": {}, \
                 \"baseline\": {}, \"target\": {target}, \"met\": {met}}}",
                json::quote(&row.measure),
                json::quote(row.unit.name()),
                number(row.blufio),
                number(row.floor),
                number(row.ratio()),
                json::quote(section.baseline),
            );
            text.push_str(if index + 1 < rows.len() { ",\n" } else { "\n" });
        }
        text.push_str("  ],\n  \"notes\": [");
        let notes: Vec<String> = self.notes.iter().map(|note| json::quote(note)).collect();
        text.push_str(&notes.join(", "));
        text.push_str("]\n}\n");
        text
    }
}

/// Renders one section as a Markdown table with aligned columns.
fn render_section(section: &Section, text: &mut String) {
    let cell = |value: Option<f64>, unit: Unit| value.map_or("–".to_owned(), |v| unit.format(v));
    let with_targets = section.rows.iter().any(|row| row.target.is_some());
    let baseline = section.baseline;
    let mut header = vec![
        "measure".to_owned(),
        "blufio".to_owned(),
        baseline.to_owned(),
        format!("blufio ÷ {baseline}"),
    ];
    if with_targets {
        header.push("target".to_owned());
    }
    let mut lines = vec![header];
    for row in &section.rows {
        let mut line = vec![
            row.measure.clone(),
            cell(row.blufio, row.unit),
            cell(row.floor, row.unit),
            row.ratio()
                .map_or("–".to_owned(), |ratio| format!("{ratio:.2}×")),
        ];
        if with_targets {
            line.push(row.target_cell());
        }
        lines.push(line);
    }
    let mut widths = vec![0; lines[0].len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for (index, line) in lines.iter().enumerate() {
        text.push('|');
        for (column, (width, cell)) in widths.iter().zip(line).enumerate() {
            let pad = " ".repeat(width - cell.chars().count());
            // The measure and the target are text, left-aligned; figures are right-aligned.
            if column == 0 || column == 4 {
                let _ = write!(text, " {cell}{pad} |");
            } else {
                let _ = write!(text, " {pad}{cell} |");
            }
        }
        text.push('\n');
        if index == 0 {
            text.push('|');
            for (column, width) in widths.iter().enumerate() {
                let dashes = "-".repeat(width + 1);
                if column == 0 || column == 4 {
                    let _ = write!(text, "{dashes}-|");
                } else {
                    let _ = write!(text, "{dashes}:|");
                }
            }
            text.push('\n');
        }
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
            r#"{"measure": "size \"x\"", "unit": "B", "blufio": 4, "floor": 2, "ratio": 2, "baseline": "floor", "target": null, "met": null}"#
        ), "{json}");
        assert!(
            json.contains(r#""blufio": 100.5, "floor": null, "ratio": null"#),
            "{json}"
        );
        assert!(json.contains(r#""notes": ["took 1 s"]"#), "{json}");
    }

    #[test]
    fn targets_bound_blufios_figure_or_the_ratio() {
        let mut report = Report::new("full");
        report.section("gateway", "direct");
        report.push_row(
            "overhead p50",
            Unit::Millis,
            Some(0.25),
            None,
            Some(Target::at_most(0.3)),
        );
        report.push_row(
            "req/s",
            Unit::PerSecond,
            Some(3_000.0),
            Some(10_000.0),
            Some(Target::ratio_at_least(0.4)),
        );
        report.push_row(
            "heap per stream",
            Unit::Bytes,
            None,
            None,
            Some(Target::at_most(32_768.0)),
        );
        let rows = &report.sections[1].rows;
        assert_eq!(rows[0].target_cell(), "≤ 0.30 ms: met");
        assert_eq!(rows[1].target_cell(), "≥ 0.40×: MISSED");
        assert_eq!(rows[2].target_cell(), "≤ 32,768: no figure");
        let json = report.render_json();
        assert!(
            json.contains(r#""baseline": "direct", "target": "≥ 0.40×", "met": false}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""target": "≤ 0.30 ms", "met": true}"#),
            "{json}"
        );
    }

    #[test]
    fn each_section_is_its_own_table_named_after_its_baseline() {
        let mut report = Report::new("quick");
        report.push(
            "idle VmRSS",
            Unit::Mebibytes,
            Some(1048576.0),
            Some(1048576.0),
        );
        report.section("empty", "nothing");
        report.section("gateway: blufio against the direct call", "direct");
        report.push_row(
            "p50",
            Unit::Millis,
            Some(0.5),
            Some(0.25),
            Some(Target::at_most(1.0)),
        );
        let table = report.render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains(" floor |") && !lines[0].contains("target"),
            "{table}"
        );
        assert!(!table.contains("empty"), "{table}");
        let title = lines
            .iter()
            .position(|line| *line == "### gateway: blufio against the direct call")
            .expect(&table);
        let header = lines[title + 2];
        assert!(header.contains(" direct |") && header.contains("blufio ÷ direct"));
        assert!(header.contains("target"), "{table}");
        let row = lines[title + 4];
        assert!(
            row.contains("2.00×") && row.contains("≤ 1.00 ms: met"),
            "{table}"
        );
        assert_eq!(row.chars().count(), header.chars().count(), "{table}");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4_019_024), "4,019,024");
    }
}
