//! GGUF v3, the llama.cpp / ggml single-file container: a small reader (header, metadata, tensor
//! infos; tensor data stays on disk) and a streaming writer (header first, then the tensors one
//! by one, so a 10 GB model is never held in memory).
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, the metadata key/value pairs, the tensor infos (name, `u32` dims count, `u64` dims with
//! `ne[0]` = the innermost = PyTorch's last dimension, `u32` ggml type, `u64` offset relative to
//! the data section), zero padding to `general.alignment` (32 by default), then the data section,
//! each tensor starting at an aligned offset.
//!
//! Only the tensor types dsvl2 stores are accepted: F32, F16, BF16, Q8_0 and Q4_K. Every error
//! names the file and what is wrong with it.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::ConfigError;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The version [`GgufWriter`] writes. Version 2 has the same little-endian layout and is read too.
pub const GGUF_VERSION: u32 = 3;
/// ggml's default (and llama.cpp's usual) data alignment.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const GGUF_MAX_DIMS: usize = 4;

/// ggml tensor type ids (`enum ggml_type`) of the formats dsvl2 reads and writes.
pub mod ggml_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
    pub const BF16: u32 = 30;
    /// dsvl2's own type: Q8_0 blocks with 16 rows interleaved (see `dsvl2_kernels::Format::Q8_0R16`),
    /// for the weights decoding reads. The id lies far from ggml's (0-40) and ik_llama.cpp's
    /// (around 200) so that no other reader mistakes the bytes for its own; they fail with "unknown
    /// type" instead. A tensor of this type has a multiple of 16 rows.
    pub const DSVL2_Q8_0_R16: u32 = 1008;
}

/// The metadata keys of a dsvl2 GGUF.
pub mod keys {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const NAME: &str = "general.name";
    /// llama.cpp's `llama_ftype` of the file (see [`super::file_type`]).
    pub const FILE_TYPE: &str = "general.file_type";
    pub const QUANTIZATION_VERSION: &str = "general.quantization_version";
    pub const ALIGNMENT: &str = "general.alignment";
    /// `config.json`, verbatim.
    pub const CONFIG_JSON: &str = "dsvl2.config_json";
    /// `processor_config.json`, verbatim.
    pub const PROCESSOR_CONFIG_JSON: &str = "dsvl2.processor_config_json";
    /// `tokenizer.json`, verbatim (llama.cpp's key for a Hugging Face tokenizer).
    pub const TOKENIZER_JSON: &str = "tokenizer.huggingface.json";
    /// `tokenizer_config.json`, verbatim, when the model has one.
    pub const TOKENIZER_CONFIG_JSON: &str = "dsvl2.tokenizer_config_json";
    /// `special_tokens_map.json`, verbatim, when the model has one.
    pub const SPECIAL_TOKENS_MAP_JSON: &str = "dsvl2.special_tokens_map_json";
}

/// `general.architecture` of a DeepSeek-VL2 GGUF.
pub const ARCHITECTURE: &str = "deepseek-vl2";

/// llama.cpp's `llama_ftype` values for `general.file_type`.
pub mod file_type {
    pub const ALL_F32: u32 = 0;
    pub const MOSTLY_F16: u32 = 1;
    pub const MOSTLY_Q8_0: u32 = 7;
    pub const MOSTLY_Q4_K_S: u32 = 14;
    pub const MOSTLY_BF16: u32 = 32;
}

/// `(elements per block, bytes per block)` of a supported ggml type; `None` for any other id.
pub fn ggml_block(type_id: u32) -> Option<(usize, usize)> {
    match type_id {
        ggml_type::F32 => Some((1, 4)),
        ggml_type::F16 | ggml_type::BF16 => Some((1, 2)),
        ggml_type::Q8_0 | ggml_type::DSVL2_Q8_0_R16 => Some((32, 34)),
        ggml_type::Q4_K => Some((256, 144)),
        _ => None,
    }
}

/// ggml's name of a type id (`"Q4_K"`), also for types dsvl2 does not support; `None` if unknown.
pub fn ggml_type_name(type_id: u32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
        "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16",
        "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    if type_id == ggml_type::DSVL2_Q8_0_R16 {
        return Some("DSVL2_Q8_0_R16");
    }
    NAMES.get(type_id as usize).copied()
}

fn describe_type(type_id: u32) -> String {
    match ggml_type_name(type_id) {
        Some(name) => format!("{type_id} ({name})"),
        None => format!("{type_id} (unknown)"),
    }
}

fn unsupported_type_reason(type_id: u32) -> String {
    format!(
        "ggml type {} is not supported (dsvl2 stores F32, F16, BF16, Q8_0, Q4_K and its own DSVL2_Q8_0_R16)",
        describe_type(type_id)
    )
}

/// Bytes of a tensor of `shape` (PyTorch order) stored as `type_id`, or why it cannot be stored:
/// an unsupported type, a last dimension that is not a whole number of blocks, too many dims,
/// or a size that overflows.
pub fn ggml_nbytes(type_id: u32, shape: &[usize]) -> Result<u64, String> {
    let (block_len, block_bytes) = ggml_block(type_id).ok_or_else(|| unsupported_type_reason(type_id))?;
    if shape.len() > GGUF_MAX_DIMS {
        return Err(format!("{} dims; GGUF allows at most {GGUF_MAX_DIMS}", shape.len()));
    }
    let row = shape.last().copied().unwrap_or(1);
    // dsvl2's interleaved q8_0 pads a row's partial last block with zeros (a whole block's bytes).
    let padded_row = if type_id == ggml_type::DSVL2_Q8_0_R16 {
        row.next_multiple_of(block_len)
    } else {
        row
    };
    if padded_row % block_len != 0 {
        return Err(format!(
            "last dimension {row} is not a multiple of the {}-element blocks of {}",
            block_len,
            ggml_type_name(type_id).unwrap_or("?")
        ));
    }
    let elems = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let rows = elems / row.max(1) as u64;
    if type_id == ggml_type::DSVL2_Q8_0_R16 && !rows.is_multiple_of(16) {
        return Err(format!("{rows} rows are not whole groups of 16 (DSVL2_Q8_0_R16)"));
    }
    (rows * (padded_row / block_len) as u64)
        .checked_mul(block_bytes as u64)
        .ok_or_else(|| format!("shape {shape:?} overflows"))
}

/// A metadata value. Arrays keep their element type, so an empty array round-trips.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array { item_type: u32, items: Vec<GgufValue> },
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF metadata value type ids (`enum gguf_type`).
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl GgufValue {
    /// The value's GGUF type id.
    pub fn type_id(&self) -> u32 {
        use value_type as t;
        match self {
            GgufValue::U8(_) => t::U8,
            GgufValue::I8(_) => t::I8,
            GgufValue::U16(_) => t::U16,
            GgufValue::I16(_) => t::I16,
            GgufValue::U32(_) => t::U32,
            GgufValue::I32(_) => t::I32,
            GgufValue::F32(_) => t::F32,
            GgufValue::Bool(_) => t::BOOL,
            GgufValue::String(_) => t::STRING,
            GgufValue::Array { .. } => t::ARRAY,
            GgufValue::U64(_) => t::U64,
            GgufValue::I64(_) => t::I64,
            GgufValue::F64(_) => t::F64,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any non-negative integer value as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self {
            GgufValue::U8(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::I8(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::U16(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::I16(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::U32(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::I32(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::F32(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::Bool(v) => out.write_all(&[u8::from(*v)]),
            GgufValue::String(s) => write_string(out, s),
            GgufValue::Array { item_type, items } => {
                out.write_all(&item_type.to_le_bytes())?;
                out.write_all(&(items.len() as u64).to_le_bytes())?;
                items.iter().try_for_each(|item| item.write(out))
            }
            GgufValue::U64(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::I64(v) => out.write_all(&v.to_le_bytes()),
            GgufValue::F64(v) => out.write_all(&v.to_le_bytes()),
        }
    }

    /// Checks that every array's items have its declared item type (recursively).
    fn check(&self) -> Result<(), String> {
        if let GgufValue::Array { item_type, items } = self {
            if *item_type > value_type::F64 {
                return Err(format!("unknown array item type {item_type}"));
            }
            for item in items {
                if item.type_id() != *item_type {
                    return Err(format!(
                        "an array of type {item_type} holds a value of type {}",
                        item.type_id()
                    ));
                }
                item.check()?;
            }
        }
        Ok(())
    }
}

impl From<&str> for GgufValue {
    fn from(s: &str) -> Self {
        GgufValue::String(s.to_string())
    }
}

impl From<String> for GgufValue {
    fn from(s: String) -> Self {
        GgufValue::String(s)
    }
}

impl From<u32> for GgufValue {
    fn from(v: u32) -> Self {
        GgufValue::U32(v)
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml type id ([`ggml_type`]); always one [`ggml_block`] knows.
    pub ggml_type: u32,
    /// PyTorch order: the last dimension is the innermost (ggml's `ne[0]`). Rows of quantized
    /// types are blocks along the last dimension.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data from the start of the file (the data section's start
    /// plus the offset stored in the tensor info); a multiple of the file's alignment.
    pub offset: u64,
    /// Bytes of data: elements / block length * block bytes.
    pub nbytes: u64,
}

impl GgufTensorInfo {
    /// The absolute byte range of the data in the file.
    pub fn byte_range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.nbytes
    }
}

/// The header of a GGUF file: metadata and tensor infos. Tensor data is not read.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order (keys are unique).
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order (names are unique).
    pub tensors: Vec<GgufTensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    pub file_size: u64,
}

impl GgufFile {
    /// Reads the header of `path`; checks that every tensor lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let io = |source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_size = file.metadata().map_err(io)?.len();
        let mut reader = HeaderReader {
            inner: BufReader::with_capacity(1 << 16, file),
            pos: 0,
            size: file_size,
            path,
        };
        read_header(&mut reader, path, file_size)
    }

    /// Parses a GGUF held in memory (`path` only labels errors).
    pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let mut reader = HeaderReader {
            inner: bytes,
            pos: 0,
            size: bytes.len() as u64,
            path,
        };
        read_header(&mut reader, path, bytes.len() as u64)
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The string value of `key`; `None` when absent or not a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn gguf_error(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads with position tracking; every short read is a "truncated" error naming what was read.
struct HeaderReader<'p, R> {
    inner: R,
    pos: u64,
    size: u64,
    path: &'p Path,
}

impl<R: Read> HeaderReader<'_, R> {
    fn truncated(&self, what: &str) -> ConfigError {
        gguf_error(
            self.path,
            format!(
                "truncated: the file ends ({} bytes) while reading {what} at byte {}",
                self.size, self.pos
            ),
        )
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, ConfigError> {
        if n > self.size.saturating_sub(self.pos) {
            return Err(self.truncated(what));
        }
        let mut buf = vec![0u8; n as usize];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.truncated(what)
            } else {
                ConfigError::Io {
                    path: self.path.to_path_buf(),
                    source: e,
                }
            }
        })?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ConfigError> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, ConfigError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, ConfigError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, ConfigError> {
        let len = self.u64(what)?;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes).map_err(|_| gguf_error(self.path, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, what: &str, depth: usize) -> Result<GgufValue, ConfigError> {
        use value_type as t;
        Ok(match type_id {
            t::U8 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            t::I8 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            t::U16 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            t::I16 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            t::U32 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            t::I32 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            t::F32 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            t::BOOL => match self.array::<1>(what)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(gguf_error(self.path, format!("{what}: invalid bool byte {b}"))),
            },
            t::STRING => GgufValue::String(self.string(what)?),
            t::ARRAY => {
                if depth >= 8 {
                    return Err(gguf_error(self.path, format!("{what}: arrays nested too deeply")));
                }
                let item_type = self.u32(what)?;
                let len = self.u64(what)?;
                let min_item = match item_type {
                    t::U8 | t::I8 | t::BOOL => 1,
                    t::U16 | t::I16 => 2,
                    t::U32 | t::I32 | t::F32 => 4,
                    t::U64 | t::I64 | t::F64 | t::STRING => 8,
                    t::ARRAY => 12,
                    other => {
                        return Err(gguf_error(
                            self.path,
                            format!("{what}: unknown array item type {other}"),
                        ))
                    }
                };
                // Refuse a length the rest of the file cannot hold before allocating for it.
                if len.saturating_mul(min_item) > self.size.saturating_sub(self.pos) {
                    return Err(self.truncated(what));
                }
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_type, what, depth + 1)?);
                }
                GgufValue::Array { item_type, items }
            }
            t::U64 => GgufValue::U64(self.u64(what)?),
            t::I64 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            t::F64 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(gguf_error(self.path, format!("{what}: unknown value type {other}"))),
        })
    }
}

fn read_header<R: Read>(r: &mut HeaderReader<'_, R>, path: &Path, file_size: u64) -> Result<GgufFile, ConfigError> {
    if file_size < 4 {
        return Err(gguf_error(
            path,
            format!("not a GGUF file: only {file_size} bytes, too short for the magic"),
        ));
    }
    let magic: [u8; 4] = r.array("the magic")?;
    if magic != GGUF_MAGIC {
        return Err(gguf_error(
            path,
            format!(
                "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
                String::from_utf8_lossy(&magic)
            ),
        ));
    }
    let version = r.u32("the version")?;
    if version != 2 && version != 3 {
        return Err(gguf_error(
            path,
            format!("unsupported GGUF version {version} (versions 2 and 3 are read)"),
        ));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    // Each metadata pair takes at least 13 bytes, each tensor info at least 24.
    if n_kv.saturating_mul(13).saturating_add(n_tensors.saturating_mul(24)) > file_size - r.pos {
        return Err(gguf_error(
            path,
            format!("truncated: the header declares {n_tensors} tensors and {n_kv} metadata pairs, more than the {file_size}-byte file holds"),
        ));
    }

    let mut metadata: Vec<(String, GgufValue)> = Vec::with_capacity(n_kv as usize);
    let mut seen = BTreeSet::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let what = format!("metadata `{key}`");
        let type_id = r.u32(&what)?;
        let value = r.value(type_id, &what, 0)?;
        if !seen.insert(key.clone()) {
            return Err(gguf_error(path, format!("duplicate metadata key `{key}`")));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == keys::ALIGNMENT) {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(gguf_error(
                    path,
                    format!("`{}` = {v:?} is not a power of two", keys::ALIGNMENT),
                ))
            }
        },
    };

    // (info, relative offset)
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = BTreeSet::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor #{i}"))?;
        let what = format!("the info of tensor `{name}`");
        let n_dims = r.u32(&what)? as usize;
        if n_dims > GGUF_MAX_DIMS {
            return Err(gguf_error(
                path,
                format!("tensor `{name}` has {n_dims} dims; GGUF allows at most {GGUF_MAX_DIMS}"),
            ));
        }
        let mut shape = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = r.u64(&what)?;
            shape.push(
                usize::try_from(d)
                    .map_err(|_| gguf_error(path, format!("tensor `{name}`: dimension {d} too large")))?,
            );
        }
        shape.reverse();
        let ggml_type = r.u32(&what)?;
        let relative = r.u64(&what)?;
        let nbytes = ggml_nbytes(ggml_type, &shape).map_err(|e| gguf_error(path, format!("tensor `{name}`: {e}")))?;
        if relative % alignment != 0 {
            return Err(gguf_error(
                path,
                format!("tensor `{name}`: data offset {relative} is not a multiple of the alignment {alignment}"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(gguf_error(path, format!("duplicate tensor `{name}`")));
        }
        tensors.push((
            GgufTensorInfo {
                name,
                ggml_type,
                shape,
                offset: 0,
                nbytes,
            },
            relative,
        ));
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    let tensors = tensors
        .into_iter()
        .map(|(mut info, relative)| {
            let end = data_offset
                .checked_add(relative)
                .and_then(|start| start.checked_add(info.nbytes));
            match end {
                Some(end) if end <= file_size => {
                    info.offset = data_offset + relative;
                    Ok(info)
                }
                _ => Err(gguf_error(
                    path,
                    format!(
                        "truncated: tensor `{}` ({} bytes at data offset {relative}) extends past the end of the \
                         {file_size}-byte file",
                        info.name, info.nbytes
                    ),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GgufFile {
        path: path.to_path_buf(),
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
        file_size,
    })
}

fn write_string(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

/// Why a GGUF could not be written.
#[derive(Debug)]
pub enum GgufWriteError {
    Io(std::io::Error),
    /// A declaration or call that does not fit the file being written.
    Invalid(String),
}

impl fmt::Display for GgufWriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufWriteError::Io(e) => write!(f, "cannot write GGUF: {e}"),
            GgufWriteError::Invalid(m) => write!(f, "cannot write GGUF: {m}"),
        }
    }
}

impl std::error::Error for GgufWriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GgufWriteError::Io(e) => Some(e),
            GgufWriteError::Invalid(_) => None,
        }
    }
}

impl From<std::io::Error> for GgufWriteError {
    fn from(e: std::io::Error) -> Self {
        GgufWriteError::Io(e)
    }
}

/// Plans a GGUF file: metadata and tensor infos first, then [`GgufWriter::begin`] writes the
/// header and returns a [`GgufDataWriter`] that takes the tensors' bytes one by one.
///
/// ```
/// use dsvl2_config::gguf::{ggml_type, GgufFile, GgufWriter};
/// let mut plan = GgufWriter::new();
/// plan.add_metadata("general.architecture", "deepseek-vl2").unwrap();
/// plan.add_tensor("w", ggml_type::F32, &[2, 3]).unwrap();
/// let mut data = plan.begin(Vec::new()).unwrap();
/// data.write_tensor("w", &[0u8; 24]).unwrap();
/// let bytes = data.finish().unwrap();
/// let file = GgufFile::from_bytes(&bytes, "mem.gguf").unwrap();
/// assert_eq!(file.tensors[0].shape, vec![2, 3]);
/// ```
#[derive(Debug, Clone)]
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    /// Offsets here are relative to the data section until `begin`.
    tensors: Vec<GgufTensorInfo>,
    data_len: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty plan with 32-byte alignment (`general.alignment` is written as `u32` 32).
    pub fn new() -> Self {
        GgufWriter {
            alignment: GGUF_DEFAULT_ALIGNMENT,
            metadata: vec![(
                keys::ALIGNMENT.to_string(),
                GgufValue::U32(GGUF_DEFAULT_ALIGNMENT as u32),
            )],
            tensors: Vec::new(),
            data_len: 0,
        }
    }

    /// Adds a metadata pair; keys must be unique. `general.alignment` is managed by the writer.
    pub fn add_metadata(&mut self, key: &str, value: impl Into<GgufValue>) -> Result<(), GgufWriteError> {
        let value = value.into();
        if key == keys::ALIGNMENT {
            return Err(GgufWriteError::Invalid(format!("`{key}` is set by the writer")));
        }
        if self.metadata.iter().any(|(k, _)| k == key) {
            return Err(GgufWriteError::Invalid(format!("duplicate metadata key `{key}`")));
        }
        value
            .check()
            .map_err(|m| GgufWriteError::Invalid(format!("metadata `{key}`: {m}")))?;
        self.metadata.push((key.to_string(), value));
        Ok(())
    }

    /// Declares the next tensor (PyTorch-order `shape`); returns its byte length, which
    /// [`GgufDataWriter::write_tensor`] will require.
    pub fn add_tensor(&mut self, name: &str, ggml_type: u32, shape: &[usize]) -> Result<u64, GgufWriteError> {
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufWriteError::Invalid(format!("duplicate tensor `{name}`")));
        }
        let nbytes =
            ggml_nbytes(ggml_type, shape).map_err(|m| GgufWriteError::Invalid(format!("tensor `{name}`: {m}")))?;
        self.tensors.push(GgufTensorInfo {
            name: name.to_string(),
            ggml_type,
            shape: shape.to_vec(),
            offset: self.data_len,
            nbytes,
        });
        self.data_len += nbytes.div_ceil(self.alignment) * self.alignment;
        Ok(nbytes)
    }

    /// Bytes of the whole file once written.
    pub fn file_size(&self) -> u64 {
        self.header_len().div_ceil(self.alignment) * self.alignment + self.data_len
    }

    fn header_len(&self) -> u64 {
        let mut counter = CountingWriter(0);
        self.write_header(&mut counter).expect("counting never fails");
        counter.0
    }

    fn write_header(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&GGUF_MAGIC)?;
        out.write_all(&GGUF_VERSION.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in &self.metadata {
            write_string(out, key)?;
            out.write_all(&value.type_id().to_le_bytes())?;
            value.write(out)?;
        }
        for t in &self.tensors {
            write_string(out, &t.name)?;
            out.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for &d in t.shape.iter().rev() {
                out.write_all(&(d as u64).to_le_bytes())?;
            }
            out.write_all(&t.ggml_type.to_le_bytes())?;
            out.write_all(&t.offset.to_le_bytes())?;
        }
        Ok(())
    }

    /// Writes the header (metadata, tensor infos, padding) to `out`; the tensors follow through
    /// the returned writer, in the declared order.
    pub fn begin<W: Write>(self, mut out: W) -> Result<GgufDataWriter<W>, GgufWriteError> {
        let header_len = self.header_len();
        let data_offset = header_len.div_ceil(self.alignment) * self.alignment;
        self.write_header(&mut out)?;
        write_zeros(&mut out, data_offset - header_len)?;
        let tensors = self
            .tensors
            .into_iter()
            .map(|mut t| {
                t.offset += data_offset;
                t
            })
            .collect();
        Ok(GgufDataWriter {
            out,
            alignment: self.alignment,
            tensors,
            next: 0,
            pos: data_offset,
        })
    }
}

/// Counts bytes (to size the header before writing it).
struct CountingWriter(u64);

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_zeros(out: &mut impl Write, n: u64) -> std::io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    let mut left = n;
    while left > 0 {
        let k = left.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// The data section of a GGUF being written: one [`write_tensor`](Self::write_tensor) per
/// declared tensor, in order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct GgufDataWriter<W: Write> {
    out: W,
    alignment: u64,
    /// Absolute offsets.
    tensors: Vec<GgufTensorInfo>,
    next: usize,
    pos: u64,
}

impl<W: Write> GgufDataWriter<W> {
    /// The declared tensors with their absolute offsets (what a reader of the file will see).
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor whose bytes are expected next, if any.
    pub fn next_tensor(&self) -> Option<&GgufTensorInfo> {
        self.tensors.get(self.next)
    }

    /// Writes the bytes of the next declared tensor, which must be `name`, then the padding.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), GgufWriteError> {
        let Some(info) = self.tensors.get(self.next) else {
            return Err(GgufWriteError::Invalid(format!(
                "tensor `{name}` was not declared (all {} declared tensors are written)",
                self.tensors.len()
            )));
        };
        if info.name != name {
            return Err(GgufWriteError::Invalid(format!(
                "tensor `{name}` written where `{}` was declared",
                info.name
            )));
        }
        if bytes.len() as u64 != info.nbytes {
            return Err(GgufWriteError::Invalid(format!(
                "tensor `{name}`: {} bytes given, {} declared",
                bytes.len(),
                info.nbytes
            )));
        }
        debug_assert_eq!(self.pos, info.offset);
        self.out.write_all(bytes)?;
        let padded = info.nbytes.div_ceil(self.alignment) * self.alignment;
        write_zeros(&mut self.out, padded - info.nbytes)?;
        self.pos += padded;
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written, flushes and returns the output.
    pub fn finish(mut self) -> Result<W, GgufWriteError> {
        if let Some(missing) = self.tensors.get(self.next) {
            return Err(GgufWriteError::Invalid(format!(
                "{} of {} tensors were not written, the first is `{}`",
                self.tensors.len() - self.next,
                self.tensors.len(),
                missing.name
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}
