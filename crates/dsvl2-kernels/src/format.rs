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
    /// q8_0 with 16 rows interleaved (dsvl2's own; rows must be a multiple of 16). Per group of 16 rows
    /// and block column `b`, 544 bytes: the 16 rows' f16 scales, then the quants as 8 chunks of 64
    /// bytes, chunk `c` holding `qs[4c .. 4c + 4]` of rows 0..16 in turn. One 512-bit `vpdpbusd` then
    /// advances 16 rows at once, each lane a row, so the scales are applied per 16 rows with one
    /// multiply-add and no shuffles (the plain layout needs a permute, a convert and an FMA per block and
    /// row). The same bytes as q8_0, reordered: see [`crate::PackedMatrix::from_f32`].
    Q8_0R16,
    /// Super-blocks of 256 (ggml `block_q4_K`): `d: f16`, `dmin: f16`, `scales: [u8; 12]` (eight 6-bit
    /// scale/min pairs), `qs: [u8; 128]` (4-bit quants); value = d * sc_j * q - dmin * m_j.
    Q4K,
}

pub const QK8_0: usize = 32;
pub const QK_K: usize = 256;
pub const Q8_0_BYTES: usize = 2 + QK8_0;
pub const Q4K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
/// Rows per interleaved group of [`Format::Q8_0R16`].
pub const R16: usize = 16;
/// Bytes of one block column of one group of [`Format::Q8_0R16`].
pub const Q8_0R16_GROUP_BYTES: usize = R16 * Q8_0_BYTES;

/// The formats a user can ask for (`--dtype`); [`Format::Q8_0R16`] is how q8_0 is stored where the
/// shape allows, not a separate choice.
const ALL: [Format; 5] = [Format::F32, Format::F16, Format::Bf16, Format::Q8_0, Format::Q4K];
/// Every format a GGUF tensor may be stored in.
const STORED: [Format; 6] = [
    Format::F32,
    Format::F16,
    Format::Bf16,
    Format::Q8_0,
    Format::Q4K,
    Format::Q8_0R16,
];

impl Format {
    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::Bf16 => 1,
            Format::Q8_0 | Format::Q8_0R16 => QK8_0,
            Format::Q4K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::Bf16 => 2,
            Format::Q8_0 | Format::Q8_0R16 => Q8_0_BYTES,
            Format::Q4K => Q4K_BYTES,
        }
    }

    /// Rows are stored in groups of this many (1: each row on its own).
    pub fn row_group(self) -> usize {
        match self {
            Format::Q8_0R16 => R16,
            _ => 1,
        }
    }

    /// Whether a matrix of `rows` rows can be stored in this format.
    pub fn supports_rows(self, rows: usize) -> bool {
        rows.is_multiple_of(self.row_group())
    }

    /// Whether the weights are 8-bit (q8_0 in either layout) or 4-bit blocks used by the integer GEMV
    /// kernels against quantized activations.
    pub fn is_block_quantized(self) -> bool {
        matches!(self, Format::Q8_0 | Format::Q8_0R16 | Format::Q4K)
    }

    /// Whether a row of `cols` elements can be stored: a whole number of blocks, or for
    /// [`Format::Q8_0R16`] any width (its rows end in a partial block padded with zeros, which add
    /// nothing to a dot product: SigLIP's fc2 has 4304 inputs).
    pub fn supports_cols(self, cols: usize) -> bool {
        self == Format::Q8_0R16 || cols.is_multiple_of(self.block_len())
    }

    /// Values per stored row: `cols` rounded up to whole blocks (only [`Format::Q8_0R16`] rounds).
    pub fn padded_cols(self, cols: usize) -> usize {
        cols.next_multiple_of(self.block_len())
    }

    /// The ggml / GGUF tensor type id ([`Format::Q8_0R16`]: dsvl2's own id, see
    /// `dsvl2_config::gguf::ggml_type::DSVL2_Q8_0_R16`).
    pub fn ggml_type(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q8_0 => 8,
            Format::Q4K => 12,
            Format::Bf16 => 30,
            Format::Q8_0R16 => 1008,
        }
    }

    pub fn from_ggml_type(t: u32) -> Option<Format> {
        STORED.into_iter().find(|f| f.ggml_type() == t)
    }

    /// Storage size of a `rows x cols` matrix (`cols` must satisfy [`Format::supports_cols`]; a
    /// partial last block takes a whole one).
    pub fn bytes_for(self, rows: usize, cols: usize) -> usize {
        rows * cols.div_ceil(self.block_len()) * self.block_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Bf16 => "bf16",
            Format::Q8_0 => "q8_0",
            Format::Q4K => "q4_k",
            Format::Q8_0R16 => "q8_0_r16",
        }
    }

    /// The formats a user can request, in declaration order (not [`Format::Q8_0R16`], which q8_0
    /// becomes where the shape allows).
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
