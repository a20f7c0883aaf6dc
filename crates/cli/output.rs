//! Printing for people: sizes, durations, aligned tables.

use std::time::Duration;

/// Policy's report on the terminal: what happened on stdout (stderr when stdout is the
/// command's answer, e.g. `pr open`'s URL), what was skipped on stderr.
pub struct Terminal {
    info_to_stderr: bool,
}

impl Terminal {
    /// What happened on stdout.
    pub fn stdout() -> Terminal {
        Terminal {
            info_to_stderr: false,
        }
    }
    /// Everything on stderr.
    pub fn stderr() -> Terminal {
        Terminal {
            info_to_stderr: true,
        }
    }
}

impl pgtwig_project::Report for Terminal {
    fn info(&mut self, line: &str) {
        if self.info_to_stderr {
            eprintln!("pgtwig: {line}");
        } else {
            println!("pgtwig: {line}");
        }
    }
    fn warn(&mut self, line: &str) {
        eprintln!("pgtwig: {line}");
    }
}

/// 1536 → "1.5 KiB".
pub fn size(bytes: u64) -> String {
    pgtwig_core::size::human(bytes)
}

pub fn duration(d: Duration) -> String {
    pgtwig_project::human_duration(d)
}

/// Print rows as columns padded to the widest cell; the first row is the header.
pub fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_well() {
        assert_eq!(super::size(512), "512 B");
        assert_eq!(super::size(1536), "1.5 KiB");
        assert_eq!(super::size(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
