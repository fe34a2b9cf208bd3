//! `wsedge billing`'s csv and table output; json is the admin API's objects as they are.

use super::{InstanceBill, LedgerRow};

/// A ledger record as text fields, in its JSON field order (`None`: null, an empty field).
pub trait Record {
    const FIELDS: &'static [&'static str];
    fn values(&self) -> Vec<Option<String>>;
}

impl Record for LedgerRow {
    const FIELDS: &'static [&'static str] = &[
        "id",
        "function",
        "instance",
        "started_at",
        "ended_at",
        "duration_ms",
        "status",
        "close_code",
        "closed_by",
        "bytes_in",
        "bytes_out",
        "messages_in",
        "messages_out",
        "data_plane",
        "kind",
        "throttled_ms",
    ];

    fn values(&self) -> Vec<Option<String>> {
        let s = |v: &dyn ToString| Some(v.to_string());
        vec![
            s(&self.id),
            s(&self.function),
            s(&self.instance),
            s(&self.started_at),
            self.ended_at.clone(),
            s(&self.duration_ms),
            self.status.map(|v| v.to_string()),
            self.close_code.map(|v| v.to_string()),
            self.closed_by.clone(),
            s(&self.bytes_in),
            s(&self.bytes_out),
            s(&self.messages_in),
            s(&self.messages_out),
            s(&self.data_plane),
            s(&self.kind),
            s(&self.throttled_ms),
        ]
    }
}

impl Record for InstanceBill {
    const FIELDS: &'static [&'static str] = &[
        "instance",
        "function",
        "started_at",
        "ended_at",
        "billed_ms",
        "gb_s",
        "invocations",
    ];

    fn values(&self) -> Vec<Option<String>> {
        vec![
            Some(self.instance.clone()),
            Some(self.function.clone()),
            Some(self.started_at.clone()),
            self.ended_at.clone(),
            Some(self.billed_ms.to_string()),
            Some(format!("{:.6}", self.gb_s)),
            Some(self.invocations.to_string()),
        ]
    }
}

/// RFC 4180: a header row, then one line per record; fields with a comma, a quote or a line
/// break are quoted.
pub fn csv<R: Record>(records: &[R]) -> String {
    let mut out = R::FIELDS.join(",");
    out.push('\n');
    for r in records {
        let fields: Vec<String> = r
            .values()
            .into_iter()
            .map(|v| {
                let v = v.unwrap_or_default();
                if v.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", v.replace('"', "\"\""))
                } else {
                    v
                }
            })
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Aligned columns under upper-case headers; `-` for null.
pub fn table<R: Record>(records: &[R]) -> String {
    let header: Vec<String> = R::FIELDS.iter().map(|f| f.to_uppercase()).collect();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            r.values()
                .into_iter()
                .map(|v| v.unwrap_or_else(|| "-".into()))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bill(instance: &str, ended_at: Option<&str>) -> InstanceBill {
        InstanceBill {
            instance: instance.into(),
            function: "echo".into(),
            started_at: "2026-01-02T03:04:05.000Z".into(),
            ended_at: ended_at.map(String::from),
            billed_ms: 1500,
            gb_s: 0.1875,
            invocations: 2,
        }
    }

    #[test]
    fn csv_has_a_header_and_quotes_what_needs_it() {
        let text = csv(&[
            bill("a,b", None),
            bill("x\"y", Some("2026-01-02T03:04:06.500Z")),
        ]);
        assert_eq!(
            text,
            "instance,function,started_at,ended_at,billed_ms,gb_s,invocations\n\
             \"a,b\",echo,2026-01-02T03:04:05.000Z,,1500,0.187500,2\n\
             \"x\"\"y\",echo,2026-01-02T03:04:05.000Z,2026-01-02T03:04:06.500Z,1500,0.187500,2\n"
        );
    }

    #[test]
    fn the_table_aligns_columns_and_shows_null_as_a_dash() {
        let text = table(&[bill("i-1", None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("INSTANCE  FUNCTION  STARTED_AT"),
            "{text}"
        );
        let ended = lines[0].find("ENDED_AT").unwrap();
        assert_eq!(&lines[1][ended..ended + 1], "-", "{text}");
    }
}
