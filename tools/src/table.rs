//! Plain-text output: aligned tables, key/value blocks, times, and the JSON-to-text helpers
//! the readable forms of the gateway's answers share.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Most rows one table prints; the rest are summarised in one line. The inputs are already
/// bounded (a command has at most 8 grants, a history page at most its limit), so this only
/// keeps a misbehaving server from flooding the terminal.
pub const MAX_TABLE_ROWS: usize = 1000;
/// Widest table cell printed; longer values are cut with an ellipsis.
pub const MAX_CELL_WIDTH: usize = 80;
/// Widest value of a key/value line (a 128-digit signature fits).
pub const MAX_VALUE_WIDTH: usize = 200;

fn cell(s: &str) -> String {
    clip(s, MAX_CELL_WIDTH)
}

fn clip(s: &str, max: usize) -> String {
    // One line per row: control characters from a server never reach the terminal.
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() > max {
        let mut cut: String = clean.chars().take(max - 1).collect();
        cut.push('…');
        cut
    } else {
        clean
    }
}

/// Renders rows under a header, columns padded to their widest cell, two spaces apart.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| cell(h)).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .take(MAX_TABLE_ROWS)
        .map(|r| r.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate().take(widths.len()) {
            if i + 1 == widths.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(row);
    }
    if rows.len() == MAX_TABLE_ROWS {
        out.push_str("(more rows not shown)\n");
    }
    out
}

/// Renders `key  value` lines with the keys padded to the widest.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let _ = writeln!(out, "{k:<width$}  {}", clip(v, MAX_VALUE_WIDTH));
    }
    out
}

/// `1700000000` → `2023-11-14T22:13:20Z`; the number itself when out of range.
pub fn unix_to_iso(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (out of range)"))
}

/// A JSON value as one short line: strings bare, `null` as `-`, everything else as JSON.
pub fn json_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.is_empty() => "-".to_owned(),
        serde_json::Value::Array(a) if a.iter().all(|x| x.is_string()) => a
            .iter()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        serde_json::Value::Object(o) if o.is_empty() => "-".to_owned(),
        serde_json::Value::Object(o) if o.values().all(|x| !x.is_object() && !x.is_array()) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", json_cell(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// Renders a list of JSON objects as a table: the `preferred` keys that any item has first
/// (with their headers), then every other key in order of first appearance (header = the
/// key), so a field a server adds later is shown rather than dropped. Non-object items are
/// shown whole.
pub fn objects_table(items: &[serde_json::Value], preferred: &[(&str, &str)]) -> String {
    let shown = &items[..items.len().min(MAX_TABLE_ROWS)];
    let present = |k: &str| shown.iter().any(|i| i.get(k).is_some());
    let mut keys: Vec<(String, String)> = preferred
        .iter()
        .filter(|(k, _)| present(k))
        .map(|(k, h)| ((*k).to_owned(), (*h).to_owned()))
        .collect();
    for item in shown {
        if let Some(obj) = item.as_object() {
            for k in obj.keys() {
                if !keys.iter().any(|(known, _)| known == k) {
                    keys.push((k.clone(), k.clone()));
                }
            }
        }
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|item| match item.as_object() {
            Some(obj) => keys
                .iter()
                .map(|(k, _)| obj.get(k).map_or_else(|| "-".to_owned(), json_cell))
                .collect(),
            None => vec![json_cell(item)],
        })
        .collect();
    let header: Vec<&str> = keys.iter().map(|(_, h)| h.as_str()).collect();
    render(&header, &rows)
}

/// One field of a JSON object as a cell (`-` when the object does not have it).
pub fn field(obj: &Map<String, Value>, key: &str) -> String {
    obj.get(key).map_or_else(|| "-".to_owned(), json_cell)
}

/// The `known` fields of `obj` as (label, cell) lines for [`key_values`], in that order, each
/// one shown (as `-`) even when missing so that its absence is visible.
pub fn labelled_fields<'a>(
    obj: &Map<String, Value>,
    known: &[(&str, &'a str)],
) -> Vec<(&'a str, String)> {
    known
        .iter()
        .map(|(key, label)| (*label, field(obj, key)))
        .collect()
}

/// The fields of `obj` not named in `exclude`, under their own names, in the object's order:
/// what a server added after this tool was written is shown rather than dropped.
pub fn other_fields<'a>(obj: &'a Map<String, Value>, exclude: &[&str]) -> Vec<(&'a str, String)> {
    obj.iter()
        .filter(|(k, _)| !exclude.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), json_cell(v)))
        .collect()
}

/// The items of a list answer: its `key` list, or else the first list in it (a renamed
/// field), or the answer itself when it is a bare list.
pub fn list_items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    match v {
        Value::Array(a) => a,
        Value::Object(o) => o
            .get(key)
            .and_then(Value::as_array)
            .or_else(|| o.values().find_map(Value::as_array))
            .map_or(&[], |a| a),
        _ => &[],
    }
}

/// `item` with its `key` object spread into `key.field` fields (other items unchanged).
pub fn spread(item: &Value, key: &str) -> Value {
    let Some(obj) = item.as_object() else {
        return item.clone();
    };
    let mut out = Map::new();
    for (k, v) in obj {
        match v.as_object() {
            Some(inner) if k == key => {
                for (ik, iv) in inner {
                    out.insert(format!("{k}.{ik}"), iv.clone());
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// A page of a listing (campaigns, a campaign's requests, support tickets, vehicles): its
/// title with the count and the order (`title`: name, order), the table, any other top-level
/// field (but `campaignId`, which a campaign's requests name in their title), and, when the
/// `cursor` field names the next page, the command for it (`next_command`), also under a page
/// with no item (a filtered page the gateway cut short).
pub fn listing_text(
    v: &Value,
    items: &[Value],
    (name, order): (&str, &str),
    columns: &[(&str, &str)],
    cursor: &str,
    next_command: impl Fn(&str) -> String,
) -> String {
    let mut out = format!("{name}: {}, {order}\n", items.len());
    if !items.is_empty() {
        out.push_str(&objects_table(items, columns));
    }
    let Some(obj) = v.as_object() else {
        return out;
    };
    for (k, val) in obj.iter().filter(|(_, val)| !val.is_array()) {
        if k != cursor && k != "campaignId" {
            out.push_str(&format!("{k}: {}\n", json_cell(val)));
        }
    }
    if let Some(next) = obj.get(cursor).filter(|n| !n.is_null()) {
        out.push_str(&next_command(&json_cell(next)));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_clean_cells() {
        let t = render(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "y\nz".into()],
                vec!["1".into(), "2".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  y z\n1    2\n");
    }

    #[test]
    fn times_and_json_cells() {
        assert_eq!(unix_to_iso(1_700_000_000), "2023-11-14T22:13:20Z");
        assert!(unix_to_iso(u64::MAX).contains("out of range"));
        assert_eq!(json_cell(&serde_json::json!(null)), "-");
        assert_eq!(json_cell(&serde_json::json!(["a", "b"])), "a, b");
        assert_eq!(json_cell(&serde_json::json!({"k": "v", "n": 1})), "k=v n=1");
        assert_eq!(json_cell(&serde_json::json!(3)), "3");
    }

    #[test]
    fn object_tables_keep_unknown_fields() {
        let items = vec![
            serde_json::json!({"seq": 2, "kind": "report", "outcome": "APPLIED"}),
            serde_json::json!({"kind": "command", "seq": 1, "extra": {"a": 1}}),
        ];
        let t = objects_table(&items, &[("kind", "KIND"), ("seq", "SEQ")]);
        assert_eq!(
            t,
            "KIND     SEQ  outcome  extra\nreport   2    APPLIED  -\ncommand  1    -        a=1\n"
        );
    }

    #[test]
    fn known_fields_come_first_and_the_others_keep_their_names() {
        let v = serde_json::json!({"a": 1, "b": null, "z": "new"});
        let obj = v.as_object().unwrap();
        let mut pairs = labelled_fields(obj, &[("a", "A"), ("missing", "M"), ("b", "B")]);
        pairs.extend(other_fields(obj, &["a", "b"]));
        assert_eq!(
            pairs,
            [
                ("A", "1".to_owned()),
                ("M", "-".to_owned()),
                ("B", "-".to_owned()),
                ("z", "new".to_owned())
            ]
        );
    }

    #[test]
    fn list_items_finds_the_list_under_its_name_another_name_or_bare() {
        let named = serde_json::json!({"other": [1], "tickets": [1, 2]});
        assert_eq!(list_items(&named, "tickets").len(), 2);
        let renamed = serde_json::json!({"n": 3, "items": [1, 2, 3]});
        assert_eq!(list_items(&renamed, "tickets").len(), 3);
        assert_eq!(list_items(&serde_json::json!([1]), "tickets").len(), 1);
        assert!(list_items(&serde_json::json!({"n": 1}), "tickets").is_empty());
    }
}
