//! Readable errors for the configuration: the config crate's, named by key and value.

use super::{
    BlockBackward, CollectiveChoice, Decay, Device, GemmChoice, GradReduce, KernelChoice, Precision, Recompute,
};

/// Turns the config crate's errors into the offending dotted key and one readable sentence
/// naming it, its value and what it takes.
pub(super) fn describe(e: ::config::ConfigError) -> (String, String) {
    let text = e.to_string();
    // "... for key `train.steps`" (and " in the environment" for variables); an unknown
    // section has no key around it.
    let (what, key) = match text.rsplit_once(" for key `") {
        Some((what, rest)) => (what, rest.split('`').next().unwrap_or_default().to_string()),
        None if text.starts_with("unknown field ") => (text.as_str(), String::new()),
        None => return (String::new(), text),
    };
    if let Some(unknown) = what.strip_prefix("unknown field ") {
        // unknown field `stpes`, expected one of `steps`, …
        let (field, expected) = unknown.split_once(", ").unwrap_or((unknown, ""));
        let field = field.trim_matches('`');
        let full = if key.is_empty() { field.to_string() } else { format!("{key}.{field}") };
        return (full.clone(), format!("unknown key `{full}`; {expected}; remove it or fix the spelling"));
    }
    if let Some(enum_part) = what.strip_prefix("enum ") {
        // enum Decay does not have variant constructor exp
        let (type_name, value) = enum_part.split_once(" does not have variant constructor ").unwrap_or((enum_part, ""));
        let choices = enum_choices(type_name, value).unwrap_or_else(|| "not one of its values".into());
        return (key.clone(), format!("{key} = {value}: {choices}"));
    }
    if let Some(types) = what.strip_prefix("invalid type: ") {
        // invalid type: string "-1", expected an integer
        let (got, expected) = types.split_once(", expected ").unwrap_or((types, ""));
        let got = got.rsplit_once(' ').map_or(got, |(_, v)| v).trim_matches(['"', '`']);
        let wanted = if expected.contains("integer") {
            "a whole number (0 or more)"
        } else if expected.contains("floating point") {
            "a number"
        } else if expected.contains("boolean") {
            "true or false"
        } else {
            expected
        };
        return (key.clone(), format!("{key} = {got}: expected {wanted}"));
    }
    (key, text)
}

/// "unknown variant `x`, expected one of `a`, `b`" for `value` of the config enum named
/// `type_name` (its own serde names, so the list cannot drift from the type).
fn enum_choices(type_name: &str, value: &str) -> Option<String> {
    fn err<T: serde::de::DeserializeOwned>(value: &str) -> Option<String> {
        serde_json::from_value::<T>(serde_json::Value::String(value.into())).err().map(|e| e.to_string())
    }
    match type_name {
        "Decay" => err::<Decay>(value),
        "CollectiveChoice" => err::<CollectiveChoice>(value),
        "Device" => err::<Device>(value),
        "Precision" => err::<Precision>(value),
        "Recompute" => err::<Recompute>(value),
        "GradReduce" => err::<GradReduce>(value),
        "BlockBackward" => err::<BlockBackward>(value),
        "KernelChoice" => err::<KernelChoice>(value),
        "GemmChoice" => err::<GemmChoice>(value),
        _ => None,
    }
}
