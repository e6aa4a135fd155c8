//! The schema check: a pipeline file's keys and types against the defaults (every unknown key
//! and wrong type reported, all at once), and the `REBALANCER_*` environment overrides.

use super::checker::Checker;
use super::raw::{self, RawPipeline};
use super::ENV_PREFIX;

/// The defaults with every optional section present: the keys a file may use.
pub(super) fn schema() -> toml::Table {
    let mut all = RawPipeline::default();
    all.scale.docker = Some(raw::RawDocker::default());
    all.gateway = Some(raw::RawGateway::default());
    toml::Table::try_from(all).expect("defaults serialize to TOML")
}

pub(super) fn env_name(path: &[String]) -> String {
    format!("{ENV_PREFIX}{}", path.join("_").to_uppercase())
}

pub(super) fn leaves(
    table: &toml::Table,
    path: &mut Vec<String>,
    f: &mut dyn FnMut(&[String], &toml::Value),
) {
    for (k, v) in table {
        path.push(k.clone());
        match v {
            toml::Value::Table(t) => leaves(t, path, f),
            _ => f(path, v),
        }
        path.pop();
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Reports unknown keys and wrong types against the defaults, all of them, and removes
/// them so the remaining keys can still be range-checked; widens integers written where
/// numbers are expected.
pub(super) fn check_tree(
    schema: &toml::Table,
    value: &mut toml::Table,
    path: &mut Vec<String>,
    ck: &mut Checker,
) {
    let mut bad = Vec::new();
    for (k, v) in value.iter_mut() {
        path.push(k.clone());
        let key = path.join(".");
        match (schema.get(k), &mut *v) {
            (None, _) => {
                let known: Vec<&str> = schema.keys().map(String::as_str).collect();
                ck.err(
                    &key,
                    format!("unknown key (known here: {})", known.join(", ")),
                );
                bad.push(k.clone());
            }
            // An empty table in the schema is a free-form map of strings (env, labels).
            (Some(toml::Value::Table(s)), toml::Value::Table(t)) if s.is_empty() => {
                for (k2, v2) in t.iter() {
                    if !v2.is_str() {
                        ck.err(
                            &format!("{key}.{k2}"),
                            format!("expected a string, found {}", type_name(v2)),
                        );
                    }
                }
                t.retain(|_, v2| v2.is_str());
            }
            (Some(toml::Value::Table(s)), toml::Value::Table(t)) => check_tree(s, t, path, ck),
            (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => {
                *v = toml::Value::Float(*i as f64);
            }
            (Some(expected), found) => {
                if std::mem::discriminant(expected) != std::mem::discriminant(found) {
                    ck.err(
                        &key,
                        format!(
                            "expected {}, found {}",
                            type_name(expected),
                            type_name(found)
                        ),
                    );
                    bad.push(k.clone());
                }
            }
        }
        path.pop();
    }
    for k in bad {
        value.remove(&k);
    }
}

pub(super) fn apply_env(
    schema: &toml::Table,
    value: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    ck: &mut Checker,
) {
    let mut sets = Vec::new();
    leaves(schema, &mut Vec::new(), &mut |path, default| {
        let name = env_name(path);
        let Some(text) = env(&name) else { return };
        let parsed = match default {
            toml::Value::String(_) => Ok(toml::Value::String(text.clone())),
            toml::Value::Boolean(_) => text
                .trim()
                .parse()
                .map(toml::Value::Boolean)
                .map_err(|_| "expected true or false"),
            toml::Value::Integer(_) => text
                .trim()
                .parse()
                .map(toml::Value::Integer)
                .map_err(|_| "expected an integer"),
            toml::Value::Float(_) => text
                .trim()
                .parse()
                .map(toml::Value::Float)
                .map_err(|_| "expected a number"),
            _ => Err("cannot be set from the environment"),
        };
        match parsed {
            Ok(v) => sets.push((path.to_vec(), v)),
            Err(why) => ck.err(
                &path.join("."),
                format!("environment variable {name}={text:?}: {why}"),
            ),
        }
    });
    for (path, v) in sets {
        let mut t = &mut *value;
        for k in &path[..path.len() - 1] {
            let entry = t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(inner) => t = inner,
                _ => return, // already reported as a type error by check_tree
            }
        }
        t.insert(path[path.len() - 1].clone(), v);
    }
}
