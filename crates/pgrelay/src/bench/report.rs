//! A bench's results: rows for the terminal table, JSON for files, series
//! for the figure, and targets that decide the exit status only when a run
//! loses data (a missed speed target is reported, not fatal).

use serde_json::{json, Map, Value};

/// One line of the results table.
pub(crate) struct Line {
    pub(crate) label: String,
    pub(crate) value: String,
}

/// A data series for the figure: (x, y) points.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

pub(crate) struct Figure {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) series: Vec<Series>,
}

/// A speed or memory target, and whether this run met it.
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) met: bool,
}

pub struct Report {
    pub(crate) title: String,
    pub(crate) lines: Vec<Line>,
    pub(crate) json: Map<String, Value>,
    pub(crate) figure: Option<Figure>,
    pub(crate) targets: Vec<Target>,
    /// Set when the run lost or duplicated data: the bench fails.
    pub(crate) failure: Option<String>,
}

impl Report {
    pub(crate) fn new(bench: &str, title: impl Into<String>) -> Report {
        let mut json = Map::new();
        json.insert("bench".into(), json!(bench));
        Report {
            title: title.into(),
            lines: Vec::new(),
            json,
            figure: None,
            targets: Vec::new(),
            failure: None,
        }
    }

    pub(crate) fn line(&mut self, label: impl Into<String>, value: impl Into<String>) {
        self.lines.push(Line {
            label: label.into(),
            value: value.into(),
        });
    }

    pub(crate) fn set(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_owned(), value);
    }

    pub(crate) fn target(&mut self, what: impl Into<String>, met: bool) {
        self.targets.push(Target {
            what: what.into(),
            met,
        });
    }

    pub fn render_table(&self) -> String {
        let width = self.lines.iter().map(|l| l.label.len()).max().unwrap_or(0);
        let mut out = format!("\n{}\n", self.title);
        for line in &self.lines {
            out.push_str(&format!("  {:<width$}  {}\n", line.label, line.value));
        }
        for target in &self.targets {
            let mark = if target.met { "met" } else { "MISSED" };
            out.push_str(&format!("  target {:<width$}  {mark}\n", target.what));
        }
        if let Some(failure) = &self.failure {
            out.push_str(&format!("  FAILED: {failure}\n"));
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let mut json = self.json.clone();
        json.insert(
            "targets".into(),
            Value::Array(
                self.targets
                    .iter()
                    .map(|t| json!({"target": t.what, "met": t.met}))
                    .collect(),
            ),
        );
        json.insert("failure".into(), json!(self.failure));
        Value::Object(json)
    }

    /// Err when the run lost data; speed targets only inform.
    pub fn verdict(&self) -> anyhow::Result<()> {
        match &self.failure {
            Some(f) => Err(anyhow::anyhow!("bench failed: {f}")),
            None => Ok(()),
        }
    }
}

/// A measured figure rounded to a whole number: float-to-integer `as`
/// saturates, and figures are non-negative and far below the limit.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "saturating rounding of a measured figure"
)]
pub(crate) fn whole(value: f64) -> u64 {
    value.round() as u64
}

/// Min, median and max of several runs' figures (at least one).
pub(crate) fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

/// A rank into sorted samples, rounded (see [`whole`]).
pub(crate) fn index(value: f64) -> usize {
    usize::try_from(whole(value)).unwrap_or(usize::MAX)
}

/// `1234567.8` → `1,234,568`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "saturating rounding of a figure for display"
)]
pub(crate) fn thousands(value: f64) -> String {
    let rounded = value.round() as i128;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_thousands() {
        assert_eq!(super::thousands(0.0), "0");
        assert_eq!(super::thousands(999.4), "999");
        assert_eq!(super::thousands(1000.0), "1,000");
        assert_eq!(super::thousands(1234567.8), "1,234,568");
        assert_eq!(super::thousands(-4321.0), "-4,321");
    }
}
