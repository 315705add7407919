//! Java properties files (`java.util.Properties.load`, which Spark uses for `--properties-file`):
//! the secret confs written after the original file's content, escaped so that any value reads
//! back exactly (Spark then trims surrounding whitespace of values, as for any properties file).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `base` (the original properties file), then one `key=value` line per conf. A later entry
/// wins when a key appears twice, so the secrets override what `base` set.
pub fn merged(base: Option<&str>, confs: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    if let Some(base) = base {
        out.push_str(base);
        // Two line breaks end a trailing continuation line of the base, if any.
        out.push_str("\n\n");
    }
    out.push_str("# secrets-webhook: secret Spark confs, fetched at start\n");
    for (key, value) in confs {
        escape(&mut out, key, true);
        out.push('=');
        escape(&mut out, value, false);
        out.push('\n');
    }
    out
}

/// As `Properties.store` escapes: backslash, line breaks, tabs and form feeds always; in keys,
/// also space, `=`, `:`, `#` and `!`; in values, a leading space. Anything outside printable ASCII
/// becomes `\uXXXX` (UTF-16), so the file reads the same in ISO-8859-1 and UTF-8.
fn escape(out: &mut String, text: &str, key: bool) {
    for (i, c) in text.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{c}' => out.push_str("\\f"),
            ' ' if key || i == 0 => out.push_str("\\ "),
            '=' | ':' | '#' | '!' if key => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
}

/// Reads a properties file back as `Properties.load` does, for tests of the writer: logical lines
/// (continuations joined), comments skipped, the first unescaped `=`, `:` or whitespace separates
/// key from value, escapes resolved. Later keys win.
#[cfg(test)]
pub fn load(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        let mut logical = line.trim_start().to_string();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        while ends_in_odd_backslashes(&logical) {
            logical.pop();
            match lines.next() {
                Some(next) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let chars: Vec<char> = logical.chars().collect();
        let mut i = 0;
        let mut key = String::new();
        while i < chars.len() {
            match chars[i] {
                '\\' => {
                    i += 1;
                    i += unescape(&chars, i, &mut key);
                    continue;
                }
                '=' | ':' | ' ' | '\t' | '\u{c}' => break,
                c => key.push(c),
            }
            i += 1;
        }
        while i < chars.len() && matches!(chars[i], ' ' | '\t' | '\u{c}') {
            i += 1;
        }
        if i < chars.len() && matches!(chars[i], '=' | ':') {
            i += 1;
        }
        while i < chars.len() && matches!(chars[i], ' ' | '\t' | '\u{c}') {
            i += 1;
        }
        let mut value = String::new();
        while i < chars.len() {
            if chars[i] == '\\' {
                i += 1;
                i += unescape(&chars, i, &mut value);
                continue;
            }
            value.push(chars[i]);
            i += 1;
        }
        out.insert(key, value);
    }
    out
}

#[cfg(test)]
fn ends_in_odd_backslashes(line: &str) -> bool {
    line.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

/// Resolves the escape starting at `chars[i]` (after the backslash) into `out`; returns how many
/// characters it used.
#[cfg(test)]
fn unescape(chars: &[char], i: usize, out: &mut String) -> usize {
    let Some(&c) = chars.get(i) else { return 0 };
    match c {
        'n' => out.push('\n'),
        'r' => out.push('\r'),
        't' => out.push('\t'),
        'f' => out.push('\u{c}'),
        'u' => {
            let hex: String = chars.iter().skip(i + 1).take(4).collect();
            let unit = u16::from_str_radix(&hex, 16).unwrap_or(0xFFFD);
            // A high surrogate is followed by `\uXXXX` with the low one.
            if (0xD800..0xDC00).contains(&unit) && chars.get(i + 5) == Some(&'\\') {
                let low: String = chars.iter().skip(i + 7).take(4).collect();
                let low = u16::from_str_radix(&low, 16).unwrap_or(0xFFFD);
                out.push_str(&String::from_utf16_lossy(&[unit, low]));
                return 11;
            }
            out.push_str(&String::from_utf16_lossy(&[unit]));
            return 5;
        }
        other => out.push(other),
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back_exactly() {
        let nasty = [
            "plain",
            " leading space",
            "trailing space ",
            "a=b:c#d!e",
            "back\\slash\\",
            "multi\nline\r\nvalue",
            "tab\there",
            "unicode é ü 漢字 🎉",
            "",
            "#not a comment",
            "\\u0041 literal",
        ];
        let confs: BTreeMap<String, String> = nasty
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("spark.k{i}"), v.to_string()))
            .chain([("spark.odd key=:#!".to_string(), "v".to_string())])
            .collect();
        let text = merged(Some("spark.k0=overridden\nspark.other=kept\\"), &confs);
        assert!(text.is_ascii(), "{text}");
        let loaded = load(&text);
        for (k, v) in &confs {
            assert_eq!(loaded.get(k), Some(v), "{k}");
        }
        // The base's trailing continuation does not swallow the first secret line.
        assert_eq!(loaded.get("spark.other").map(String::as_str), Some("kept"));
        assert_eq!(loaded.len(), confs.len() + 1);
    }
}
