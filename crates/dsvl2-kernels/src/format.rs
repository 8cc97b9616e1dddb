//! Weight storage formats. Byte layouts are ggml's, so GGUF tensors can be wrapped without conversion.

use std::fmt;
use std::str::FromStr;

use crate::KernelError;

/// Storage format of a [`crate::PackedMatrix`]. Every row is stored as `cols / block_len` blocks of
/// `block_bytes` bytes, rows back to back (ggml's layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    Bf16,
    /// Blocks of 32: `d: f16`, `qs: [i8; 32]`; value = d * q.
    Q8_0,
    /// Super-blocks of 256 (ggml `block_q4_K`): `d: f16`, `dmin: f16`, `scales: [u8; 12]` (eight 6-bit
    /// scale/min pairs), `qs: [u8; 128]` (4-bit quants); value = d * sc_j * q - dmin * m_j.
    Q4K,
}

pub const QK8_0: usize = 32;
pub const QK_K: usize = 256;
pub const Q8_0_BYTES: usize = 2 + QK8_0;
pub const Q4K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;

const ALL: [Format; 5] = [Format::F32, Format::F16, Format::Bf16, Format::Q8_0, Format::Q4K];

impl Format {
    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::Bf16 => 1,
            Format::Q8_0 => QK8_0,
            Format::Q4K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::Bf16 => 2,
            Format::Q8_0 => Q8_0_BYTES,
            Format::Q4K => Q4K_BYTES,
        }
    }

    /// Whether a row of `cols` elements is a whole number of blocks.
    pub fn supports_cols(self, cols: usize) -> bool {
        cols.is_multiple_of(self.block_len())
    }

    /// The ggml / GGUF tensor type id.
    pub fn ggml_type(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q8_0 => 8,
            Format::Q4K => 12,
            Format::Bf16 => 30,
        }
    }

    pub fn from_ggml_type(t: u32) -> Option<Format> {
        ALL.into_iter().find(|f| f.ggml_type() == t)
    }

    /// Storage size of a `rows x cols` matrix (`cols` must satisfy [`Format::supports_cols`]).
    pub fn bytes_for(self, rows: usize, cols: usize) -> usize {
        rows * (cols / self.block_len()) * self.block_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Bf16 => "bf16",
            Format::Q8_0 => "q8_0",
            Format::Q4K => "q4_k",
        }
    }

    /// All formats, in declaration order.
    pub fn all() -> [Format; 5] {
        ALL
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| KernelError::UnknownFormat {
                name: s.to_string(),
                valid: ALL.map(Format::name).join(", "),
            })
    }
}
