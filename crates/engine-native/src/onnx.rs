//! The few ONNX protobuf messages the native engine reads.
//!
//! ONNX files are `ModelProto` messages. We declare only the fields we use,
//! with the field numbers of `onnx.proto`; prost skips every other field, so
//! files written by newer exporters still decode. Declaring them by hand
//! keeps `protoc` out of the build.

use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    /// Free-form key/value metadata; tickserve's model tools record pruning
    /// here (`tickserve_engine::PRUNING_METADATA_KEY`).
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    #[prost(string, optional, tag = "7")]
    pub domain: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, packed = "false", tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
}

/// `TensorProto.DataType` values the engine understands.
pub mod elem_type {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "14")]
    pub data_location: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `TypeProto` is a oneof in `onnx.proto`; a oneof member is wire-identical
/// to an optional field, and tensors are the only member we read.
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TypeProtoTensor>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProtoTensor {
    #[prost(int32, optional, tag = "1")]
    pub elem_type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

impl NodeProto {
    pub fn op(&self) -> &str {
        self.op_type.as_deref().unwrap_or("")
    }

    /// A readable handle for error messages: `Conv node '/conv1/Conv'`.
    pub fn describe(&self) -> String {
        match self.name.as_deref() {
            Some(name) if !name.is_empty() => format!("{} node '{}'", self.op(), name),
            _ => format!(
                "{} node producing '{}'",
                self.op(),
                self.output.first().map(String::as_str).unwrap_or("?")
            ),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }

    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }

    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }

    pub fn attr_string(&self, name: &str) -> Option<String> {
        self.attr(name)
            .and_then(|a| a.s.as_deref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }

    /// The node's `i`-th input name, or `None` when absent or given as the
    /// empty string (ONNX's way of skipping an optional input).
    pub fn input_name(&self, i: usize) -> Option<&str> {
        self.input
            .get(i)
            .map(String::as_str)
            .filter(|name| !name.is_empty())
    }
}

/// Decoded constant tensor contents.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstData {
    Float(Vec<f32>),
    Int(Vec<i64>),
}

impl TensorProto {
    /// Reads the tensor's values from whichever field holds them.
    pub fn decode(&self) -> Result<ConstData, String> {
        if self.data_location == Some(1) {
            return Err(
                "external tensor data is not supported; save the model with weights embedded"
                    .into(),
            );
        }
        let raw = self.raw_data.as_deref().filter(|r| !r.is_empty());
        match self.data_type.unwrap_or(0) {
            elem_type::FLOAT => Ok(ConstData::Float(match raw {
                Some(bytes) => bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                None => self.float_data.clone(),
            })),
            elem_type::INT64 => Ok(ConstData::Int(match raw {
                Some(bytes) => bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
                None => self.int64_data.clone(),
            })),
            elem_type::INT32 => Ok(ConstData::Int(match raw {
                Some(bytes) => bytes
                    .chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect(),
                None => self.int32_data.iter().map(|&v| i64::from(v)).collect(),
            })),
            // Quantised weights and zero points (QDQ models); ONNX keeps
            // 8-bit values in `int32_data` when not in `raw_data`.
            t @ (elem_type::INT8 | elem_type::UINT8) => Ok(ConstData::Int(match raw {
                Some(bytes) => bytes
                    .iter()
                    .map(|&b| {
                        if t == elem_type::INT8 {
                            i64::from(b as i8)
                        } else {
                            i64::from(b)
                        }
                    })
                    .collect(),
                None => self.int32_data.iter().map(|&v| i64::from(v)).collect(),
            })),
            other => Err(format!("tensor element type {other} is not supported")),
        }
    }
}
