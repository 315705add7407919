//! Secret canaries, searched for in every encoding a leak could take. A value that reaches a log
//! line, a response or a metric rarely does so raw: a debug print of a Secret patch shows it in
//! base64, a JSON log line escapes its quotes, a `Debug` print its backslashes, a byte dump is hex,
//! and a `Debug` print of a `k8s_openapi` Secret shows its `ByteString`s as lists of numbers.
//!
//! Searched forms of each canary: raw; JSON-escaped (serde's, and ASCII-only `\uXXXX`); Rust
//! `Debug`-escaped; URL-encoded; hex (lower and upper case); clipped (raw, four characters off
//! each end, as a message that cuts a value short would show it); its bytes as decimal numbers (a
//! `Vec<u8>`'s `Debug`, `[99, 65, ...]`, and its JSON, `[99,65,...]`); standard and URL-safe
//! base64 at each of the three alignments a value can have inside a longer base64 text (a patch, a
//! whole Secret), matching only the characters that depend on the canary alone.
//!
//! Canaries should be at least 16 bytes and hold characters that escaping changes (`"`, `\`, a
//! non-ASCII letter), so the escaped forms differ from the raw one.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// Every form of `canary` to search for: (encoding name, text).
pub fn encodings(canary: &str) -> Vec<(&'static str, String)> {
    let bytes = canary.as_bytes();
    let mut out = vec![("raw", canary.to_owned())];
    let chars: Vec<char> = canary.chars().collect();
    if chars.len() >= 16 {
        out.push(("clipped", chars[4..chars.len() - 4].iter().collect()));
    }
    let quoted = serde_json::to_string(canary).unwrap_or_default();
    out.push(("JSON-escaped", unquote(&quoted)));
    out.push(("JSON-escaped (ASCII)", unquote(&json_ascii(canary))));
    out.push(("Debug-escaped", unquote(&format!("{canary:?}"))));
    out.push((
        "URL-encoded",
        form_urlencoded::byte_serialize(bytes).collect(),
    ));
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    out.push(("hex (upper case)", hex.to_uppercase()));
    out.push(("hex", hex));
    let numbers: Vec<String> = bytes.iter().map(u8::to_string).collect();
    out.push(("bytes as numbers (Debug)", numbers.join(", ")));
    out.push(("bytes as numbers (JSON)", numbers.join(",")));
    for offset in 0..3 {
        out.push(("base64", base64_core(bytes, offset, &STANDARD_NO_PAD)));
        out.push(("base64url", base64_core(bytes, offset, &URL_SAFE_NO_PAD)));
    }
    out.sort();
    out.dedup_by(|a, b| a.1 == b.1);
    out
}

/// The encoding in which `text` holds `canary`, if it does.
pub fn find(text: &str, canary: &str) -> Option<&'static str> {
    encodings(canary)
        .into_iter()
        .find(|(_, form)| !form.is_empty() && text.contains(form.as_str()))
        .map(|(name, _)| name)
}

/// Panics when any `(what, text)` holds any canary in any encoding, naming where, which canary
/// and how it was encoded (and showing the text around it).
pub fn assert_no_leak<W: AsRef<str>, T: AsRef<str>>(texts: &[(W, T)], canaries: &[&str]) {
    for (what, text) in texts {
        let text = text.as_ref();
        for canary in canaries {
            if let Some(encoding) = find(text, canary) {
                let form = encodings(canary)
                    .into_iter()
                    .find(|(n, f)| *n == encoding && text.contains(f.as_str()))
                    .map(|(_, f)| f)
                    .unwrap_or_default();
                let at = text.find(&form).unwrap_or(0);
                let mut from = at.saturating_sub(300);
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                let mut to = (at + form.len() + 300).min(text.len());
                while !text.is_char_boundary(to) {
                    to += 1;
                }
                panic!(
                    "canary {canary:?} leaked ({encoding}) into {}: ...{}...",
                    what.as_ref(),
                    &text[from..to]
                );
            }
        }
    }
}

/// The base64 characters of `bytes` placed `offset` bytes (0..3) into a 3-byte group: only the
/// characters that no neighbouring byte influences, so they appear in any longer base64 text
/// that holds `bytes` at that alignment.
fn base64_core(bytes: &[u8], offset: usize, engine: &impl base64::Engine) -> String {
    let mut padded = vec![0u8; offset];
    padded.extend_from_slice(bytes);
    let encoded = engine.encode(&padded);
    let start = (8 * offset).div_ceil(6);
    let end = (8 * (offset + bytes.len())) / 6;
    encoded.get(start..end).unwrap_or_default().to_owned()
}

fn unquote(s: &str) -> String {
    let s = s.strip_prefix('"').unwrap_or(s);
    s.strip_suffix('"').unwrap_or(s).to_owned()
}

/// JSON string escaping with every non-ASCII character as `\uXXXX` (UTF-16), as ASCII-only
/// serializers write it.
fn json_ascii(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The search finds each encoding at every alignment, and nothing where there is nothing.
pub fn check_the_search() {
    let canary = "cAnary-\"q\\z\u{e9}-5d1e9a";
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = base64::engine::general_purpose::URL_SAFE;
    for prefix in ["", "x", "xy", "xyz", "{\"data\":{\"k\":\""] {
        let inside = format!("{prefix}{canary}\"}}}}");
        for text in [b64.encode(&inside), url.encode(&inside)] {
            assert!(find(&text, canary).is_some(), "{prefix:?}: {text}");
        }
    }
    let json = serde_json::json!({ "v": canary }).to_string();
    assert!(
        find(&json, canary).is_some_and(|e| e.contains("escaped")),
        "{json}"
    );
    assert!(find(&format!("{canary:?}"), canary).is_some());
    assert!(find(&canary.replace('"', "%22"), canary).is_none());
    assert!(find(&json_ascii(canary), canary).is_some());
    let hex: String = canary.bytes().map(|b| format!("{b:02X}")).collect();
    assert!(find(&hex, canary).is_some());
    let bytes = canary.as_bytes().to_vec();
    assert!(find(&format!("ByteString({bytes:?})"), canary).is_some());
    assert!(find(&serde_json::to_string(&bytes).unwrap_or_default(), canary).is_some());
    assert_eq!(find(&canary[3..canary.len() - 3], canary), Some("clipped"));
    assert_eq!(find("nothing to see", canary), None);
}
