//! Output shapes shared by commands: kubectl-like tables and the `-o` flag.

use std::fmt::Write as _;

/// `-o`: how tables are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// Aligned columns with more of them.
    Wide,
    /// JSON.
    Json,
}

/// Columns left-aligned, separated by three spaces like kubectl; the last
/// column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                let _ = write!(out, "{cell}{}   ", " ".repeat(pad));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell() {
        let rows = vec![
            vec!["client".to_owned(), "server".to_owned(), "√".to_owned()],
            vec!["c".to_owned(), "plain".to_owned(), "not_meshed".to_owned()],
        ];
        assert_eq!(
            table(&["SRC", "DST", "SECURED"], &rows),
            "SRC      DST      SECURED\n\
             client   server   √\n\
             c        plain    not_meshed\n"
        );
    }
}
