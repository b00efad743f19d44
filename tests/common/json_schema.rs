//! A JSON Schema checker for the subset of draft 2020-12 that `schema/*.schema.json` uses:
//! `type` (a name or a list), `properties`, `required`, `additionalProperties` (`false` or
//! a schema), `items`, `pattern`, `enum`, `const`, `oneOf`, `anyOf`, and `$ref` to
//! `#/$defs/NAME`. Any other keyword is an error, so the schema cannot use one this
//! checker would silently ignore. (A full validator crate builds dozens of crates for
//! these few keywords.)
#![allow(dead_code)]

use regex_lite::Regex;
use serde_json::Value;

/// Checks `value` against `schema` (whose `$defs` the `$ref`s name). The errors say where
/// (a JSON pointer) and what; empty when `value` conforms.
pub fn check(root: &Value, schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    walk(root, schema, value, "", &mut errors);
    errors
}

/// Checks `value` against the definition `#/$defs/NAME` of `root`.
pub fn check_def(root: &Value, name: &str, value: &Value) -> Vec<String> {
    match root.pointer(&format!("/$defs/{name}")) {
        Some(def) => check(root, def, value),
        None => vec![format!("no definition {name:?} in the schema")],
    }
}

const KNOWN: [&str; 16] = [
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "pattern",
    "enum",
    "const",
    "oneOf",
    "anyOf",
    "$ref",
    "description",
    "title",
    "$schema",
    "$id",
    "$defs",
];

fn type_ok(name: &str, v: &Value) -> bool {
    match name {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_u64() || v.is_i64(),
        _ => false,
    }
}

fn walk(root: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        if schema == &Value::Bool(false) {
            errors.push(format!("{at}: not allowed"));
        } else if schema != &Value::Bool(true) {
            errors.push(format!("{at}: schema is not an object: {schema}"));
        }
        return;
    };
    for key in s.keys() {
        if !KNOWN.contains(&key.as_str()) {
            errors.push(format!("{at}: the checker does not know the keyword {key:?}"));
        }
    }
    if let Some(r) = s.get("$ref") {
        let target = r
            .as_str()
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|p| root.pointer(p));
        match target {
            Some(t) => walk(root, t, v, at, errors),
            None => errors.push(format!("{at}: unresolved $ref {r}")),
        }
    }
    if let Some(t) = s.get("type") {
        let names: Vec<&str> = match t {
            Value::String(n) => vec![n.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !names.iter().any(|n| type_ok(n, v)) {
            errors.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errors.push(format!("{at}: {v} is not one of {}", Value::Array(e.clone())));
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        errors.push(format!("{at}: {v} is not {c}"));
    }
    if let (Some(p), Some(text)) = (s.get("pattern").and_then(Value::as_str), v.as_str()) {
        match Regex::new(p) {
            Ok(re) if re.is_match(text) => {}
            Ok(_) => errors.push(format!("{at}: {text:?} does not match {p:?}")),
            Err(e) => errors.push(format!("{at}: bad pattern {p:?}: {e}")),
        }
    }
    for (key, all) in [("oneOf", false), ("anyOf", true)] {
        if let Some(subs) = s.get(key).and_then(Value::as_array) {
            let mut fits = 0;
            let mut why = Vec::new();
            for sub in subs {
                let mut e = Vec::new();
                walk(root, sub, v, at, &mut e);
                if e.is_empty() {
                    fits += 1;
                } else {
                    why.extend(e);
                }
            }
            let ok = if all { fits >= 1 } else { fits == 1 };
            if !ok {
                errors.push(format!(
                    "{at}: {key}: {fits} of {} alternatives fit ({})",
                    subs.len(),
                    why.join("; ")
                ));
            }
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(format!("{at}: missing required {r:?}"));
                }
            }
        }
        for (k, val) in obj {
            let here = format!("{at}/{k}");
            match props.and_then(|p| p.get(k)) {
                Some(sub) => walk(root, sub, val, &here, errors),
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => errors.push(format!("{at}: unexpected property {k:?}")),
                    Some(sub) => walk(root, sub, val, &here, errors),
                    None => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            walk(root, items, item, &format!("{at}/{i}"), errors);
        }
    }
}
