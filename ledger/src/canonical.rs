//! The canonical JSON text of any `Serialize` value, written straight from it: the same bytes as
//! `chain::canonical_json(&serde_json::to_value(value)?)` (keys sorted by their bytes, a key given
//! twice kept once with its last value, no whitespace, scalars as `serde_json` writes them),
//! without building the `Value` tree first and dropping it after.
//!
//! Each object is written into a scratch buffer field by field, then copied out in key order.

use serde::ser::{self, Impossible, Serialize};
use serde_json::Error;

/// The canonical JSON text of `value`.
pub fn to_canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<String, Error> {
    let mut out = Vec::with_capacity(256);
    value.serialize(Canonical { out: &mut out })?;
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

fn error(message: &str) -> Error {
    <Error as ser::Error>::custom(message)
}

/// Writes one JSON value into `out`.
struct Canonical<'a> {
    out: &'a mut Vec<u8>,
}

impl Canonical<'_> {
    /// A scalar, as `serde_json` writes it (and as `Value` would hold and write it).
    fn scalar(self, write: impl FnOnce(&mut serde_json::Serializer<&mut Vec<u8>>) -> Result<(), Error>) -> Result<(), Error> {
        write(&mut serde_json::Serializer::new(self.out))
    }
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing a string to a Vec cannot fail");
}

/// An object being written: its fields' keys and values in `scratch`, sorted when it ends.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    scratch: Vec<u8>,
    /// Each field: (key start, key end, value end) in `scratch`; the value starts at the key's end.
    fields: Vec<(usize, usize, usize)>,
    /// A map's key written by `serialize_key`, waiting for its value.
    pending_key: Option<(usize, usize)>,
    /// Written inside `{"variant": ...}` (a struct variant).
    variant: Option<&'static str>,
    /// A `serde_json::value::RawValue`: one field holding JSON text, which `Value` parses.
    raw: bool,
}

/// The struct name `serde_json` gives a `RawValue` (its JSON text is its one field).
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

impl<'a> Object<'a> {
    fn new(out: &'a mut Vec<u8>, fields: usize, variant: Option<&'static str>) -> Object<'a> {
        // A length hint is only a hint: what is reserved up front stays small.
        let fields = fields.min(64);
        Object {
            out,
            scratch: Vec::with_capacity(fields * 24),
            fields: Vec::with_capacity(fields),
            pending_key: None,
            variant,
            raw: false,
        }
    }

    fn key(&mut self, key: &str) -> (usize, usize) {
        let start = self.scratch.len();
        self.scratch.extend_from_slice(key.as_bytes());
        (start, self.scratch.len())
    }

    fn value<T: Serialize + ?Sized>(&mut self, (start, end): (usize, usize), value: &T) -> Result<(), Error> {
        value.serialize(Canonical { out: &mut self.scratch })?;
        self.fields.push((start, end, self.scratch.len()));
        Ok(())
    }

    fn finish(self) -> Result<(), Error> {
        let Object {
            out,
            scratch,
            mut fields,
            variant,
            raw,
            ..
        } = self;
        if raw {
            // As `Value` takes it: the text parsed, then written canonically.
            let &[(_, key_end, value_end)] = fields.as_slice() else {
                return Err(error("a raw JSON value has one field"));
            };
            let text: String = serde_json::from_slice(&scratch[key_end..value_end])?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            out.extend_from_slice(crate::chain::canonical_json(&value).as_bytes());
            return Ok(());
        }
        // Stable: of a key given twice, the last one written stays last, and is the one kept.
        fields.sort_by(|a, b| scratch[a.0..a.1].cmp(&scratch[b.0..b.1]));
        if let Some(variant) = variant {
            out.push(b'{');
            write_str(out, variant);
            out.push(b':');
        }
        out.push(b'{');
        let mut first = true;
        for (index, &(start, end, value_end)) in fields.iter().enumerate() {
            if fields
                .get(index + 1)
                .is_some_and(|next| scratch[next.0..next.1] == scratch[start..end])
            {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            let key = std::str::from_utf8(&scratch[start..end]).expect("keys are written from strings");
            write_str(out, key);
            out.push(b':');
            out.extend_from_slice(&scratch[end..value_end]);
        }
        out.push(b'}');
        if variant.is_some() {
            out.push(b'}');
        }
        Ok(())
    }
}

/// An array being written.
struct Array<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    /// Written inside `{"variant": ...}` (a tuple variant).
    variant: bool,
}

impl<'a> Array<'a> {
    fn new(out: &'a mut Vec<u8>, variant: Option<&'static str>) -> Array<'a> {
        if let Some(variant) = variant {
            out.push(b'{');
            write_str(out, variant);
            out.push(b':');
        }
        out.push(b'[');
        Array {
            out,
            first: true,
            variant: variant.is_some(),
        }
    }

    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        value.serialize(Canonical { out: &mut *self.out })
    }

    fn finish(self) -> Result<(), Error> {
        self.out.push(b']');
        if self.variant {
            self.out.push(b'}');
        }
        Ok(())
    }
}

impl<'a> ser::Serializer for Canonical<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.scalar(|s| ser::Serializer::serialize_bool(s, v))
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.scalar(|s| ser::Serializer::serialize_i64(s, v))
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        // As `Value` holds it: a number when it fits 64 bits, refused otherwise.
        match (i64::try_from(v), u64::try_from(v)) {
            (Ok(v), _) => self.serialize_i64(v),
            (_, Ok(v)) => self.serialize_u64(v),
            _ => Err(error("number out of range")),
        }
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.scalar(|s| ser::Serializer::serialize_u64(s, v))
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        match u64::try_from(v) {
            Ok(v) => self.serialize_u64(v),
            Err(_) => Err(error("number out of range")),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        // `Value` keeps an f32 as the f64 it widens to.
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        // Not finite: `Value` holds null, and so does the text.
        self.scalar(|s| ser::Serializer::serialize_f64(s, v))
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        write_str(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        let mut array = Array::new(self.out, None);
        for byte in v {
            array.element(byte)?;
        }
        array.finish()
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Error> {
        self.serialize_str(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.push(b':');
        value.serialize(Canonical { out: &mut *self.out })?;
        self.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Array<'a>, Error> {
        Ok(Array::new(self.out, None))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Array<'a>, Error> {
        Ok(Array::new(self.out, None))
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Array<'a>, Error> {
        Ok(Array::new(self.out, None))
    }
    fn serialize_tuple_variant(self, _name: &'static str, _index: u32, variant: &'static str, _len: usize) -> Result<Array<'a>, Error> {
        Ok(Array::new(self.out, Some(variant)))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Object<'a>, Error> {
        Ok(Object::new(self.out, len.unwrap_or(8), None))
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Object<'a>, Error> {
        let mut object = Object::new(self.out, len, None);
        object.raw = name == RAW_VALUE_TOKEN;
        Ok(object)
    }
    fn serialize_struct_variant(self, _name: &'static str, _index: u32, variant: &'static str, len: usize) -> Result<Object<'a>, Error> {
        Ok(Object::new(self.out, len, Some(variant)))
    }
}

macro_rules! array_impl {
    ($trait:ident, $method:ident) => {
        impl ser::$trait for Array<'_> {
            type Ok = ();
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.element(value)
            }
            fn end(self) -> Result<(), Error> {
                self.finish()
            }
        }
    };
}
array_impl!(SerializeSeq, serialize_element);
array_impl!(SerializeTuple, serialize_element);
array_impl!(SerializeTupleStruct, serialize_field);
array_impl!(SerializeTupleVariant, serialize_field);

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        let start = self.scratch.len();
        key.serialize(MapKey { out: &mut self.scratch })?;
        self.pending_key = Some((start, self.scratch.len()));
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self.pending_key.take().ok_or_else(|| error("a map value without its key"))?;
        self.value(key, value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

/// A struct's fields, and a struct variant's: keys known up front.
macro_rules! object_impl {
    ($trait:ident) => {
        impl ser::$trait for Object<'_> {
            type Ok = ();
            type Error = Error;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
                let key = self.key(key);
                self.value(key, value)
            }
            fn end(self) -> Result<(), Error> {
                self.finish()
            }
        }
    };
}
object_impl!(SerializeStruct);
object_impl!(SerializeStructVariant);

/// A map's key, as `Value` takes it: a string, or a number, bool or char written as one
/// (unescaped: it is escaped when the object is written).
struct MapKey<'a> {
    out: &'a mut Vec<u8>,
}

impl MapKey<'_> {
    fn text(self, text: &str) -> Result<(), Error> {
        self.out.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

fn key_must_be_a_string() -> Error {
    error("key must be a string")
}

/// Integer keys, written as their decimal text.
macro_rules! key_as_text {
    ($($method:ident: $type:ty),*) => {
        $(fn $method(self, v: $type) -> Result<(), Error> {
            self.text(&v.to_string())
        })*
    };
}

impl ser::Serializer for MapKey<'_> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Impossible<(), Error>;
    type SerializeTuple = Impossible<(), Error>;
    type SerializeTupleStruct = Impossible<(), Error>;
    type SerializeTupleVariant = Impossible<(), Error>;
    type SerializeMap = Impossible<(), Error>;
    type SerializeStruct = Impossible<(), Error>;
    type SerializeStructVariant = Impossible<(), Error>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.text(if v { "true" } else { "false" })
    }
    key_as_text!(
        serialize_i8: i8,
        serialize_i16: i16,
        serialize_i32: i32,
        serialize_i64: i64,
        serialize_i128: i128,
        serialize_u8: u8,
        serialize_u16: u16,
        serialize_u32: u32,
        serialize_u64: u64,
        serialize_u128: u128
    );
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        if !v.is_finite() {
            return Err(error("float key must be finite"));
        }
        self.text(&serde_json::to_string(&v)?)
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        if !v.is_finite() {
            return Err(error("float key must be finite"));
        }
        self.text(&serde_json::to_string(&v)?)
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.text(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.text(v)
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_none(self) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit(self) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Error> {
        self.text(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<(), Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeTupleStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(key_must_be_a_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use proptest::prelude::*;
    use serde::Serialize;
    use serde_json::{json, Value};

    use super::to_canonical_json;
    use crate::chain::canonical_json;

    /// The text of the `Value` route, which `verify` recomputes from what the database holds.
    fn by_value<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
        Ok(canonical_json(&serde_json::to_value(value)?))
    }

    fn same<T: Serialize + std::fmt::Debug>(value: T) {
        assert_eq!(to_canonical_json(&value).unwrap(), by_value(&value).unwrap(), "{value:?}");
    }

    #[derive(Debug, Serialize)]
    #[serde(tag = "type")]
    enum Tagged {
        Struct {
            zebra: u8,
            apple: Option<String>,
            middle: Vec<f32>,
        },
        Unit,
        Newtype(Inner),
    }

    #[derive(Debug, Serialize)]
    struct Inner {
        b: i128,
        a: u128,
        #[serde(skip_serializing_if = "Option::is_none")]
        gone: Option<u8>,
        c: char,
        #[serde(with = "serde_bytes_as_seq")]
        d: Vec<u8>,
    }

    mod serde_bytes_as_seq {
        pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(bytes)
        }
    }

    #[derive(Debug, Serialize)]
    enum External {
        Unit,
        Newtype(u8),
        Tuple(u8, String),
        Struct { y: (), x: bool },
    }

    #[derive(Debug, Serialize)]
    struct Flattened {
        z: u8,
        #[serde(flatten)]
        rest: BTreeMap<String, Value>,
        #[serde(rename = "a")]
        renamed: &'static str,
    }

    #[derive(Debug, Serialize)]
    struct Wrapper(Tagged);

    #[derive(Debug, Serialize)]
    struct UnitStruct;

    #[test]
    fn typed_values_write_the_same_text_as_through_a_value() {
        same(Tagged::Struct {
            zebra: 1,
            apple: None,
            middle: vec![0.1, f32::NAN, -0.0, 1e30],
        });
        same(Tagged::Unit);
        same(Tagged::Newtype(Inner {
            b: -(1 << 62),
            a: u128::from(u64::MAX),
            gone: None,
            c: '"',
            d: vec![0, 255],
        }));
        same(Wrapper(Tagged::Unit));
        same([
            External::Unit,
            External::Newtype(3),
            External::Tuple(1, "é\u{1}".into()),
            External::Struct { y: (), x: true },
        ]);
        same(UnitStruct);
        same((1u8, "two", 3.5f64, f64::INFINITY, None::<u8>, Some(Some(1))));
        same(HashMap::from([(3u64, "c"), (20, "b"), (1, "a")]));
        same(BTreeMap::from([(true, 1), (false, 2)]));
        same(HashMap::from([('z', 1), ('a', 2)]));
        same(HashMap::from([(F(1.5), 1), (F(-0.25), 2)]));
        // A key given twice (a flattened map naming a field): the last written is kept.
        same(Flattened {
            z: 1,
            rest: BTreeMap::from([("z".to_string(), json!("again")), ("a".to_string(), json!([1]))]),
            renamed: "last",
        });
        same(json!({"b": {"é": 1, "e": 2, "E": 3, "": 4}, "a": [{"y": null, "x": []}, {}], "\u{7f}": "\u{2028}"}));
        // Raw JSON text is parsed and written canonically, as `Value` parses it.
        let raw = serde_json::value::RawValue::from_string(r#"{ "b": [1, {"d": 2, "c": 3}], "a": "x" }"#.to_string()).unwrap();
        same(HashMap::from([("raw", raw)]));
    }

    #[test]
    fn refusals_are_the_same_as_through_a_value() {
        assert!(to_canonical_json(&u128::MAX).is_err() && by_value(&u128::MAX).is_err());
        assert!(to_canonical_json(&i128::MIN).is_err() && by_value(&i128::MIN).is_err());
        let keyed_by_list = HashMap::from([(vec![1u8], 1)]);
        assert!(to_canonical_json(&keyed_by_list).is_err() && by_value(&keyed_by_list).is_err());
        let keyed_by_nan = HashMap::from([(1, 1)].map(|(_, v)| (F(f64::NAN), v)));
        assert!(to_canonical_json(&keyed_by_nan).is_err() && by_value(&keyed_by_nan).is_err());
    }

    #[derive(Debug, PartialEq)]
    struct F(f64);
    impl Eq for F {}
    impl std::hash::Hash for F {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            self.0.to_bits().hash(state)
        }
    }
    impl Serialize for F {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_f64(self.0)
        }
    }

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8).prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_value_writes_its_canonical_text(value in any_value()) {
            prop_assert_eq!(to_canonical_json(&value).unwrap(), canonical_json(&value));
        }
    }
}
