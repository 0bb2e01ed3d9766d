//! Mutations of a JSON document for property tests of code that reads JSON another
//! process wrote: structural ones on its value (extreme or mistyped values, deleted,
//! wrapped and duplicated members), then byte-level ones on its text (flipped bits, cuts,
//! inserted bytes).
//!
//! [`Mutation`], [`mutations`] and [`apply_bytes`] are format-neutral (the coordinator's
//! TOML mutator uses them too).
//!
//! Compiled only for this crate's tests and with the `hostile-input` feature, which other
//! crates of the workspace enable in their `[dev-dependencies]`; release builds never
//! carry it (nor proptest).

use proptest::prelude::*;
use serde_json::Value;

/// One mutation; `usize`s pick a node (or byte) modulo how many there are.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Replace a node by an extreme or mistyped value.
    Replace(usize, usize),
    /// Delete an object member.
    Delete(usize),
    /// Wrap a node in an array (`true`) or an object.
    Wrap(usize, bool),
    /// Give an object a duplicate of one of its keys, with an extreme value.
    Duplicate(usize, usize),
    /// Flip bits of a byte of the text.
    Flip(usize, u8),
    /// Cut the text.
    Truncate(usize),
    /// Insert bytes into the text.
    Insert(usize, Vec<u8>),
}

/// Extreme and mistyped JSON values, as text (some of them not JSON at all).
pub const EXTREMES: &[&str] = &[
    "null",
    "true",
    "-1",
    "0",
    "1",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e308",
    "-1e308",
    "1e999",
    "NaN",
    "Infinity",
    "0.5",
    "\"\"",
    "\"../../../etc/passwd\"",
    "\"/etc/passwd\"",
    "\"manifest.json\"",
    "\"\\u0000\"",
    "\"u32\"",
    "\"step-99999999\"",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "[0, -1, 18446744073709551615]",
    "{\"\": null}",
];

/// One random [`Mutation`].
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), any::<usize>()).prop_map(|(p, v)| Mutation::Replace(p, v)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(p, a)| Mutation::Wrap(p, a)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(p, v)| Mutation::Duplicate(p, v)),
        1 => (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
    ]
}

/// One to four random [`Mutation`]s.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..5)
}

/// JSON pointers of every node of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                pointers(x, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                pointers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// `doc` with `mutations` applied, as bytes of compact JSON (one line before byte-level
/// mutations, as in a JSON Lines file).
pub fn apply(doc: &Value, mutations: &[Mutation]) -> Vec<u8> {
    apply_as(doc, mutations, false)
}

/// `doc` with `mutations` applied, as bytes of pretty-printed JSON (as manifests are
/// written).
pub fn apply_pretty(doc: &Value, mutations: &[Mutation]) -> Vec<u8> {
    apply_as(doc, mutations, true)
}

fn apply_as(doc: &Value, mutations: &[Mutation], pretty: bool) -> Vec<u8> {
    let mut v = doc.clone();
    // Text spliced in for markers after serialising (values serde_json cannot hold).
    let mut splices: Vec<(String, String)> = Vec::new();
    let mut bytes_ops = Vec::new();
    for m in mutations {
        let mut all = Vec::new();
        pointers(&v, String::new(), &mut all);
        let pick = |i: usize| all[i % all.len()].clone();
        let mut marker = |text: String| {
            let name = format!("@@splice{}@@", splices.len());
            splices.push((format!("\"{name}\""), text));
            Value::String(name)
        };
        match m {
            Mutation::Replace(p, e) => {
                let new = marker(EXTREMES[e % EXTREMES.len()].to_string());
                if let Some(node) = v.pointer_mut(&pick(*p)) {
                    *node = new;
                }
            }
            Mutation::Delete(p) => {
                let ptr = pick(*p);
                if let Some((parent, key)) = ptr.rsplit_once('/') {
                    if let Some(Value::Object(o)) = v.pointer_mut(parent) {
                        o.remove(&key.replace("~1", "/").replace("~0", "~"));
                    }
                }
            }
            Mutation::Wrap(p, array) => {
                if let Some(node) = v.pointer_mut(&pick(*p)) {
                    let inner = node.take();
                    *node = if *array { Value::Array(vec![inner]) } else { serde_json::json!({ "x": inner }) };
                }
            }
            Mutation::Duplicate(p, e) => {
                let ptr = pick(*p);
                if let Some(Value::Object(o)) = v.pointer(&ptr) {
                    if let Some(key) = o.keys().next() {
                        let body = serde_json::to_string(o).unwrap_or_default();
                        let text = format!(
                            "{{{}:{},{}",
                            serde_json::to_string(key).unwrap_or_default(),
                            EXTREMES[e % EXTREMES.len()],
                            &body[1..]
                        );
                        let new = marker(text);
                        if let Some(node) = v.pointer_mut(&ptr) {
                            *node = new;
                        }
                    }
                }
            }
            other => bytes_ops.push(other.clone()),
        }
    }
    let mut text =
        if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.unwrap_or_default();
    // Later markers may sit inside earlier splices: splice newest first.
    for (name, with) in splices.iter().rev() {
        text = text.replace(name, with);
    }
    let mut bytes = text.into_bytes();
    apply_bytes(&mut bytes, &bytes_ops);
    bytes
}

/// The byte-level mutations among `mutations` (flips, cuts, insertions) applied to
/// `bytes`, in order; structural ones are passed over. Format-neutral: mutators of other
/// formats (TOML) use it after their own structural mutations.
pub fn apply_bytes(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for op in mutations {
        let n = bytes.len().max(1);
        match op {
            Mutation::Flip(i, b) => {
                if let Some(x) = bytes.get_mut(i % n) {
                    *x ^= b;
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % n),
            Mutation::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            _ => {}
        }
    }
}

/// File names a manifest must not name: absolute paths, paths with `..` or other
/// separators, empty, hidden and NUL-bearing names, the manifest itself.
pub fn escaping_file_name() -> impl Strategy<Value = String> {
    let part = "[a-z0-9._-]{1,12}";
    prop_oneof![
        Just(String::new()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("/etc/passwd".to_string()),
        Just("../x".to_string()),
        Just("manifest.json".to_string()),
        Just("a\0b".to_string()),
        Just("..\\x".to_string()),
        part.prop_map(|p| format!("/{p}")),
        part.prop_map(|p| format!("../{p}")),
        part.prop_map(|p| format!(".{p}")),
        (part, part).prop_map(|(a, b)| format!("{a}/{b}")),
        (part, part).prop_map(|(a, b)| format!("{a}/../../{b}")),
    ]
}
