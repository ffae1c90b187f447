//! How Braze applies one attribute of an accepted attributes object to what a profile holds.
//!
//! Each rule names the Braze documentation page it follows:
//! - **Plain values replace; `null` removes.** "Setting a custom attribute value to `null`
//!   removes it from the user profile" (braze.com/docs/api/objects_filters/user_attributes_object).
//! - **Strings longer than 255 characters are not stored**: the attribute keeps its value
//!   while the object's other attributes apply (…/user_guide/data/activation/custom_data/
//!   custom_attributes, "Custom attribute data types", strings up to 255 characters).
//! - **Array operations** `{"add": [..]}` and `{"remove": [..]}` change the held array item by
//!   item; Braze keeps arrays free of duplicates; `{"inc": n}` adds to a number
//!   (…/objects_filters/user_attributes_object, "Custom attribute data", arrays and
//!   incrementing).
//! - **Nested objects merge deeply with `_merge_objects: true`**, and replace otherwise
//!   (…/custom_attributes/nested_custom_attribute_support, "Update nested custom attributes").
//! - **Arrays of objects** take `{"$add": [objects]}`, `{"$update": [{"$identifier_key",
//!   "$identifier_value", "$new_object"}]}` and `{"$remove": [{"$identifier_key",
//!   "$identifier_value"}]}` (…/nested_custom_attribute_support, "Array of objects"); an
//!   update merges `$new_object` into every object whose key matches.
//! - **Per-item fields**: `subscription_groups` is a list of `{subscription_group_id,
//!   subscription_state}`, each applied on its own group; what the profile holds is every group
//!   ever set, with its latest state (…/objects_filters/user_attributes_object, "Braze user
//!   profile fields", `subscription_groups`).

use serde_json::{Map, Value};

/// Braze's limit on a custom string attribute, in characters.
pub const MAX_STRING_CHARS: usize = 255;

/// Whether an attributes object asks for nested objects to be merged rather than replaced.
pub fn merges(object: &Value) -> bool {
    object.get("_merge_objects") == Some(&Value::Bool(true))
}

/// What `attribute` holds after `write` is applied to `held` (see the module doc); `None`
/// when it holds nothing.
pub fn apply(attribute: &str, held: Option<Value>, write: &Value, merge: bool) -> Option<Value> {
    if attribute == "subscription_groups" {
        return Some(subscription_groups(held, write));
    }
    if write
        .as_str()
        .is_some_and(|s| s.chars().count() > MAX_STRING_CHARS)
    {
        return held;
    }
    if let Some(ops) = operations(write, &["add", "remove", "inc"]) {
        return Some(array_or_number_ops(held, ops));
    }
    if let Some(ops) = operations(write, &["$add", "$update", "$remove"]) {
        return Some(object_array_ops(held, ops));
    }
    match (held, write) {
        (_, Value::Null) => None,
        (Some(Value::Object(mut old)), Value::Object(new)) if merge => {
            merge_deep(&mut old, new);
            Some(Value::Object(old))
        }
        (_, v) => Some(v.clone()),
    }
}

/// `write` as an object of operations if all its keys are among `names`.
fn operations<'a>(write: &'a Value, names: &[&str]) -> Option<&'a Map<String, Value>> {
    write
        .as_object()
        .filter(|o| !o.is_empty() && o.keys().all(|k| names.contains(&k.as_str())))
}

fn items(held: Option<Value>) -> Vec<Value> {
    match held {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

fn list<'a>(ops: &'a Map<String, Value>, name: &str) -> impl Iterator<Item = &'a Value> {
    ops.get(name)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn array_or_number_ops(held: Option<Value>, ops: &Map<String, Value>) -> Value {
    if let Some(n) = ops.get("inc").and_then(Value::as_f64) {
        let now = held.as_ref().and_then(Value::as_f64).unwrap_or(0.0) + n;
        return serde_json::Number::from_f64(now).map_or(Value::Null, Value::Number);
    }
    let mut items = items(held);
    for item in list(ops, "add") {
        if !items.contains(item) {
            items.push(item.clone());
        }
    }
    let gone: Vec<&Value> = list(ops, "remove").collect();
    items.retain(|i| !gone.contains(&i));
    Value::Array(items)
}

fn object_array_ops(held: Option<Value>, ops: &Map<String, Value>) -> Value {
    let mut items = items(held);
    items.extend(list(ops, "$add").cloned());
    let matches = |item: &Value, op: &Value| {
        let key = op.get("$identifier_key").and_then(Value::as_str);
        let value = op.get("$identifier_value");
        key.zip(value).is_some_and(|(k, v)| item.get(k) == Some(v))
    };
    for op in list(ops, "$update") {
        let Some(Value::Object(new)) = op.get("$new_object") else {
            continue;
        };
        for item in items.iter_mut().filter(|i| matches(i, op)) {
            if let Value::Object(old) = item {
                merge_deep(old, new);
            }
        }
    }
    let removals: Vec<&Value> = list(ops, "$remove").collect();
    items.retain(|i| !removals.iter().any(|op| matches(i, op)));
    Value::Array(items)
}

/// Merges `new` into `old`: nested objects merge key by key, anything else replaces, `null`
/// removes the key.
fn merge_deep(old: &mut Map<String, Value>, new: &Map<String, Value>) {
    for (k, v) in new {
        match (old.get_mut(k), v) {
            (_, Value::Null) => {
                old.remove(k);
            }
            (Some(Value::Object(inner)), Value::Object(update)) => merge_deep(inner, update),
            _ => {
                old.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Each `{subscription_group_id, subscription_state}` item sets that group's state; the
/// others keep theirs.
fn subscription_groups(held: Option<Value>, write: &Value) -> Value {
    let mut groups = items(held);
    let id_of = |v: &Value| v.get("subscription_group_id").cloned();
    for item in write.as_array().into_iter().flatten() {
        let Some(id) = id_of(item) else {
            continue;
        };
        match groups.iter_mut().find(|g| id_of(g).as_ref() == Some(&id)) {
            Some(group) => *group = item.clone(),
            None => groups.push(item.clone()),
        }
    }
    Value::Array(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn after(attribute: &str, held: Option<Value>, writes: &[(Value, bool)]) -> Option<Value> {
        writes
            .iter()
            .fold(held, |h, (w, merge)| apply(attribute, h, w, *merge))
    }

    #[test]
    fn a_string_over_255_characters_leaves_the_attribute_as_it_was() {
        let long = "é".repeat(256);
        let held = after(
            "tier",
            None,
            &[(json!("gold"), false), (json!(long), false)],
        );
        assert_eq!(held, Some(json!("gold")));
        let exact = "x".repeat(255);
        assert_eq!(
            after("tier", None, &[(json!(exact), false)]),
            Some(json!(exact))
        );
    }

    #[test]
    fn merge_objects_merges_nested_objects_deeply_and_null_removes() {
        let held = Some(json!({"car": {"make": "Ford", "year": 2010}, "pet": "cat"}));
        let write = json!({"car": {"year": 2020, "color": null}, "home": "flat"});
        let merged = after("profile", held.clone(), &[(write.clone(), true)]);
        let expected = json!({"car": {"make": "Ford", "year": 2020}, "pet": "cat", "home": "flat"});
        assert_eq!(merged, Some(expected));
        assert_eq!(
            after("profile", held, &[(write.clone(), false)]),
            Some(write)
        );
    }

    #[test]
    fn arrays_of_objects_take_add_update_and_remove_by_identifier() {
        let held = Some(json!([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]));
        let write = json!({
            "$add": [{"id": 3, "name": "c"}],
            "$update": [{"$identifier_key": "id", "$identifier_value": 1, "$new_object": {"name": "A"}}],
            "$remove": [{"$identifier_key": "id", "$identifier_value": 2}],
        });
        let expected = json!([{"id": 1, "name": "A"}, {"id": 3, "name": "c"}]);
        assert_eq!(after("pets", held, &[(write, false)]), Some(expected));
    }

    #[test]
    fn subscription_groups_apply_item_by_item() {
        let a = json!([{"subscription_group_id": "a", "subscription_state": "subscribed"}]);
        let b = json!([{"subscription_group_id": "b", "subscription_state": "subscribed"}]);
        let a_off = json!([{"subscription_group_id": "a", "subscription_state": "unsubscribed"}]);
        let held = after(
            "subscription_groups",
            None,
            &[(a, false), (b.clone(), false), (a_off.clone(), false)],
        );
        let expected = json!([a_off[0], b[0]]);
        assert_eq!(held, Some(expected));
    }

    #[test]
    fn add_remove_and_inc_change_values_item_by_item() {
        let held = after(
            "tags",
            Some(json!(["x"])),
            &[
                (json!({"add": ["y", "x"]}), false),
                (json!({"remove": ["x"]}), false),
            ],
        );
        assert_eq!(held, Some(json!(["y"])));
        let n = after("n", Some(json!(2)), &[(json!({"inc": 3}), false)]);
        assert_eq!(n, Some(json!(5.0)));
        assert_eq!(
            after("tier", Some(json!("gold")), &[(Value::Null, false)]),
            None
        );
    }
}
