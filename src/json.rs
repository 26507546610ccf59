//! Conversions between `serde_json` values and the protobuf well-known `Value`/`Struct`,
//! both ways: upstream JSON goes into messages, and the CLI prints messages as JSON.
//!
//! JSON numbers become doubles, as protobuf's `Value` has no integer kind; integers beyond
//! 2^53 lose precision on the way, as they would in any JavaScript client.
//!
//! Protobuf decoders refuse messages nested more than 100 deep (prost, and the C++, Java
//! and Python runtimes), and each JSON array costs two levels, each object three. An array
//! or object deeper than [`MAX_DEPTH`] JSON levels is therefore carried as its JSON text, a
//! string, so that every message the gateway sends can be decoded.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Value as Json};

/// The deepest JSON nesting (arrays and objects) carried as protobuf structure. The values
/// sit at most four messages deep (`Execution.result.metadata` fields), so 30 levels of
/// objects stay below the decoders' limit of 100: 4 + 3 * 30 = 94.
pub const MAX_DEPTH: usize = 30;

pub fn to_value(json: Json) -> Value {
    value_at(json, 0)
}

pub fn to_struct(map: Map<String, Json>) -> Struct {
    struct_at(map, 1)
}

/// `json`, found inside `depth` arrays and objects.
fn value_at(json: Json, depth: usize) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(flag) => Kind::BoolValue(flag),
        Json::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(f64::NAN)),
        Json::String(text) => Kind::StringValue(text),
        nested if depth >= MAX_DEPTH => Kind::StringValue(nested.to_string()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items
                .into_iter()
                .map(|item| value_at(item, depth + 1))
                .collect(),
        }),
        Json::Object(map) => Kind::StructValue(struct_at(map, depth + 1)),
    };
    Value { kind: Some(kind) }
}

/// An object that is itself `depth` levels deep.
fn struct_at(map: Map<String, Json>, depth: usize) -> Struct {
    Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, value_at(v, depth)))
            .collect(),
    }
}

/// `None` for an empty map, so messages leave the field unset rather than send `{}`.
pub fn to_optional_struct(map: Map<String, Json>) -> Option<Struct> {
    (!map.is_empty()).then(|| to_struct(map))
}

/// Removes `key` from `map` and returns it read by `read`, but only when `read` accepts it:
/// a value of an unexpected type stays in the map, to be passed on rather than lost.
pub fn take_if<T>(
    map: &mut Map<String, Json>,
    key: &str,
    read: impl Fn(&Json) -> Option<T>,
) -> Option<T> {
    let value = read(map.get(key)?)?;
    map.remove(key);
    Some(value)
}

pub fn from_value(value: &Value) -> Json {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(flag)) => Json::Bool(*flag),
        Some(Kind::NumberValue(number)) => from_number(*number),
        Some(Kind::StringValue(text)) => Json::String(text.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(object)) => from_struct(object),
    }
}

pub fn from_struct(object: &Struct) -> Json {
    Json::Object(
        object
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect(),
    )
}

/// Whole numbers print without a fraction, as they came from the upstream.
fn from_number(number: f64) -> Json {
    if number.fract() == 0.0 && number.abs() < 9.007_199_254_740_992e15 {
        Json::from(number as i64)
    } else {
        serde_json::Number::from_f64(number).map_or(Json::Null, Json::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_nested_json() {
        let original = json!({
            "url": "https://x/a.mp4", "size": 1024, "ratio": 1.5, "tags": ["a", null, true],
            "nested": {"deep": {"k": "v"}}
        });
        let converted = to_value(original.clone());
        assert_eq!(from_value(&converted), original);
    }

    #[test]
    fn json_nested_beyond_the_limit_is_carried_as_text() {
        // Found by the status_body fuzz target's round-trip check: a result nested 60 arrays
        // deep made an Execution that the gateway sent but no protobuf decoder accepts.
        let nested = |depth: usize| -> Json {
            serde_json::from_str(&format!("{}1{}", "[".repeat(depth), "]".repeat(depth))).unwrap()
        };
        assert_eq!(from_value(&to_value(nested(MAX_DEPTH))), nested(MAX_DEPTH));

        let deep = to_value(nested(MAX_DEPTH + 5));
        let mut innermost = &deep;
        for _ in 0..MAX_DEPTH {
            match &innermost.kind {
                Some(Kind::ListValue(list)) => innermost = &list.values[0],
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            innermost.kind,
            Some(Kind::StringValue("[[[[[1]]]]]".into()))
        );

        let mut object = json!(1);
        for _ in 0..MAX_DEPTH {
            object = json!({ "k": object });
        }
        let Json::Object(map) = object else {
            unreachable!()
        };
        let converted = to_struct(map.clone());
        assert_eq!(from_struct(&converted), Json::Object(map));
    }

    #[test]
    fn empty_maps_leave_the_field_unset() {
        assert_eq!(to_optional_struct(Map::new()), None);
    }
}
