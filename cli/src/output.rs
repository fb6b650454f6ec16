//! Terminal and machine output: aligned tables, colour only on a TTY,
//! progress lines on stderr only on a TTY, and JSON/YAML for scripts.

use std::io::{IsTerminal, Write};

use serde::Serialize;

/// `-o/--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// `--color`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub format: Format,
    pub color: bool,
    /// Progress lines on stderr (only when stderr is a terminal).
    pub progress: bool,
}

impl Output {
    pub fn new(format: Format, color: ColorChoice) -> Output {
        let color = match color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        };
        Output { format, color, progress: std::io::stderr().is_terminal() }
    }

    pub fn is_table(&self) -> bool {
        self.format == Format::Table
    }

    /// Prints `value` as JSON or YAML (for table format the caller renders).
    pub fn machine<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let text = match self.format {
            Format::Json => serde_json::to_string_pretty(value)? + "\n",
            Format::Yaml => serde_saphyr::to_string(value)?,
            Format::Table => unreachable!("machine output asked for table format"),
        };
        std::io::stdout().write_all(text.as_bytes())?;
        Ok(())
    }

    /// Shows what a long step is doing (overwritten in place), on a TTY only.
    pub fn step(&self, what: &str) {
        if self.progress {
            eprint!("\r\x1b[2K{what}…");
        }
    }

    /// A warning on stderr (always shown; machine output stays clean).
    pub fn warn(&self, what: &str) {
        self.done();
        let head = self.paint("warning:", Style::Warn);
        eprintln!("{head} {what}");
    }

    /// Clears the progress line.
    pub fn done(&self) {
        if self.progress {
            eprint!("\r\x1b[2K");
        }
    }

    pub fn paint(&self, text: &str, style: Style) -> String {
        if !self.color {
            return text.to_string();
        }
        let code = match style {
            Style::Ok => "32",
            Style::Info => "36",
            Style::Warn => "33",
            Style::Bad => "31;1",
            Style::Dim => "2",
            Style::Bold => "1",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Style {
    Ok,
    Info,
    Warn,
    Bad,
    Dim,
    Bold,
}

/// Rows under headers, columns padded to the widest cell (two spaces apart,
/// the last column unpadded).
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(visible_len(c));
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                line.push_str(c);
                if i + 1 < cols {
                    line.push_str(&" ".repeat(width[i] - visible_len(c) + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Length without ANSI colour sequences.
fn visible_len(s: &str) -> usize {
    let mut n = 0;
    let mut in_escape = false;
    for c in s.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => n += 1,
        }
    }
    n
}

/// "3m12s", "2h5m", "4d": a short age.
pub fn age(d: jiff::SignedDuration) -> String {
    let s = d.as_secs().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_ignoring_colour() {
        let mut t = Table::new(&["ID", "LABELS"]);
        t.row(vec!["300".into(), "k8s:app=web;".into()]);
        t.row(vec!["\x1b[31m65535\x1b[0m".into(), "x".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID     LABELS");
        assert_eq!(lines[1], "300    k8s:app=web;");
        assert_eq!(lines[2], "\x1b[31m65535\x1b[0m  x");
    }

    #[test]
    fn ages() {
        assert_eq!(age(jiff::SignedDuration::from_secs(59)), "59s");
        assert_eq!(age(jiff::SignedDuration::from_secs(192)), "3m12s");
        assert_eq!(age(jiff::SignedDuration::from_secs(7500)), "2h5m");
        assert_eq!(age(jiff::SignedDuration::from_secs(3 * 86400 + 7200)), "3d2h");
    }
}
