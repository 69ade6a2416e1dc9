//! A strict parser for the Prometheus text exposition format 0.0.4, as Prometheus itself
//! would read a scrape: it rejects what a scrape would reject and checks the conventions
//! (`_total` counters, cumulative histogram buckets ending in `+Inf` equal to `_count`).

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub families: HashMap<String, Family>,
}

/// One expected series: name, labels and value.
pub type Series<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

impl Exposition {
    /// Asserts each `(name, labels, value)` series has exactly that value.
    #[track_caller]
    pub fn assert_values(&self, expected: &[Series]) {
        for (name, labels, value) in expected {
            assert_eq!(self.value(name, labels), Some(*value), "{name} {labels:?}");
        }
    }

    /// Returns the value of the sample with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find_map(|sample| {
                let same = sample.name == name
                    && sample.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| sample.labels.iter().any(|(sk, sv)| sk == k && sv == v));
                same.then_some(sample.value)
            })
    }

    pub fn family(&self, name: &str) -> &Family {
        self.families
            .get(name)
            .unwrap_or_else(|| panic!("no metric family {name}"))
    }
}

/// Parses `text`, panicking with the line number on the first violation.
pub fn parse(text: &str) -> Exposition {
    let mut exposition = Exposition::default();
    let mut current: Option<String> = None;
    let mut finished: Vec<String> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let fail = |why: &str| -> ! { panic!("line {number}: {why}: {line:?}") };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let keyword = parts.next().unwrap_or_default();
            let name = parts
                .next()
                .unwrap_or_else(|| fail("comment without a name"));
            let value = parts.next().unwrap_or_default();
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            check_name(name).unwrap_or_else(|why| fail(&why));
            if current.as_deref() != Some(name) {
                if finished.iter().any(|f| f == name) {
                    fail("family appears twice");
                }
                if let Some(previous) = current.take() {
                    finished.push(previous);
                }
                current = Some(name.to_owned());
            }
            let family = exposition.families.entry(name.to_owned()).or_default();
            if keyword == "TYPE" {
                if !family.kind.is_empty() {
                    fail("second TYPE line");
                }
                if !family.samples.is_empty() {
                    fail("TYPE after samples");
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&value) {
                    fail("unknown type");
                }
                family.kind = value.to_owned();
            } else {
                if family.help.is_some() {
                    fail("second HELP line");
                }
                family.help = Some(value.to_owned());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).unwrap_or_else(|why| fail(&why));
        let family_name = current
            .clone()
            .unwrap_or_else(|| fail("sample without a TYPE line before it"));
        let family = exposition.families.get_mut(&family_name).expect("family");
        let allowed: Vec<String> = match family.kind.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{family_name}{suffix}"))
                .collect(),
            "summary" => vec![
                family_name.clone(),
                format!("{family_name}_sum"),
                format!("{family_name}_count"),
            ],
            _ => vec![family_name.clone()],
        };
        if !allowed.contains(&sample.name) {
            fail("sample name does not belong to the current family");
        }
        family.samples.push(sample);
    }
    for (name, family) in &exposition.families {
        assert!(family.help.is_some(), "{name} has no HELP");
        assert!(!family.kind.is_empty(), "{name} has no TYPE");
        if family.kind == "counter" {
            assert!(
                name.ends_with("_total"),
                "counter {name} does not end in _total"
            );
        } else {
            assert!(
                !name.ends_with("_total"),
                "non-counter {name} ends in _total"
            );
        }
        if family.kind == "histogram" {
            check_histogram(name, family);
        }
    }
    exposition
}

/// A series' labels, `le` aside.
type Labels = Vec<(String, String)>;

fn check_histogram(name: &str, family: &Family) {
    // One series per label set (a histogram with labels has several), `le` aside.
    let mut series: Vec<(Labels, Vec<&Sample>)> = Vec::new();
    for sample in family
        .samples
        .iter()
        .filter(|s| s.name.ends_with("_bucket"))
    {
        let labels: Labels = sample
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        match series.iter_mut().find(|(known, _)| *known == labels) {
            Some((_, buckets)) => buckets.push(sample),
            None => series.push((labels, vec![sample])),
        }
    }
    assert!(!series.is_empty(), "{name} has no buckets");
    for (labels, buckets) in series {
        let total = check_buckets(name, &buckets);
        let same = |s: &&Sample| s.labels.iter().filter(|(k, _)| k != "le").eq(labels.iter());
        let count = family
            .samples
            .iter()
            .filter(same)
            .find(|s| s.name.ends_with("_count"))
            .unwrap_or_else(|| panic!("{name} {labels:?} has no _count"));
        assert_eq!(
            count.value, total,
            "{name} {labels:?}: +Inf bucket differs from _count"
        );
        assert!(
            family
                .samples
                .iter()
                .filter(same)
                .any(|s| s.name.ends_with("_sum")),
            "{name} {labels:?} has no _sum"
        );
    }
}

/// Checks one series' buckets and returns the count of its `+Inf` bucket.
fn check_buckets(name: &str, buckets: &[&Sample]) -> f64 {
    let mut previous_bound = f64::NEG_INFINITY;
    let mut previous_count = 0.0;
    for bucket in buckets {
        let le = bucket
            .labels
            .iter()
            .find(|(k, _)| k == "le")
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} bucket without le"));
        let bound = parse_value(le).unwrap_or_else(|_| panic!("{name}: bad le {le:?}"));
        assert!(bound > previous_bound, "{name}: buckets not increasing");
        assert!(
            bucket.value >= previous_count,
            "{name}: buckets not cumulative"
        );
        previous_bound = bound;
        previous_count = bucket.value;
    }
    assert!(
        previous_bound.is_infinite(),
        "{name}: last bucket is not +Inf"
    );
    previous_count
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let consumed;
        loop {
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                consumed = Some(start + 1);
                break;
            }
            let eq = after[start..].find('=').ok_or("label without =")? + start;
            let label = &after[start..eq];
            if label.is_empty()
                || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || label.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("invalid label name {label:?}"));
            }
            let mut value = String::new();
            let body = after.get(eq + 1..).ok_or("label without value")?;
            if !body.starts_with('"') {
                return Err("label value not quoted".into());
            }
            let mut escaped = false;
            let mut end = None;
            for (offset, c) in body.char_indices().skip(1) {
                if escaped {
                    match c {
                        '\\' | '"' => value.push(c),
                        'n' => value.push('\n'),
                        _ => return Err(format!("bad escape \\{c}")),
                    }
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    end = Some(eq + 1 + offset + 1);
                    break;
                } else {
                    value.push(c);
                }
            }
            let end = end.ok_or("unterminated label value")?;
            labels.push((label.to_owned(), value));
            while chars.peek().is_some_and(|&(i, _)| i < end) {
                chars.next();
            }
            if let Some(&(_, ',')) = chars.peek() {
                chars.next();
            }
        }
        rest = &after[consumed.ok_or("unterminated label set")?..];
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next().ok_or("sample without a value")?)?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing text after sample".into());
    }
    if !rest.starts_with(' ') {
        return Err("no space before value".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| format!("bad value {text:?}")),
    }
}

#[test]
fn strict_parser_rejects_what_prometheus_rejects() {
    let bad = [
        "# TYPE a counter\na 1\n",                       // counter without _total
        "a_total 1\n",                                   // no TYPE
        "# HELP x h\n# TYPE x gauge\nx{l=\"v} 1\n",      // unterminated
        "# HELP x h\n# TYPE x gauge\nx{1l=\"v\"} 1\n",   // bad label name
        "# HELP x h\n# TYPE x gauge\nx one\n",           // bad value
        "# HELP x h\n# TYPE x gauge\ny 1\n",             // wrong family
        "# HELP x h\n# TYPE x gauge\nx 1\n# HELP x h\n", // family twice
    ];
    for text in bad {
        let result = std::panic::catch_unwind(|| parse(text));
        assert!(result.is_err(), "accepted {text:?}");
    }
    let good = parse(
        "# HELP h_seconds h\n# TYPE h_seconds histogram\n\
         h_seconds_bucket{le=\"0.1\"} 1\nh_seconds_bucket{le=\"+Inf\"} 2\n\
         h_seconds_sum 0.3\nh_seconds_count 2\n",
    );
    assert_eq!(good.value("h_seconds_count", &[]), Some(2.0));
}
