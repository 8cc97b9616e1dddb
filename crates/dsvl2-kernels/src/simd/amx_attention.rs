//! Decode attention of several queries over one range of an i8 cache on AMX-INT8: the case of a
//! prompt's positions shared by a batch of sequences (see `decode_attention_shared`).
//!
//! Run one query at a time, the range is read from L2 once per query, and every query pays the
//! whole per-position work again (widening each i8 row, a dot product and an axpy per head): with
//! eight readers that was most of a batched step's attention time. Here the queries are the columns
//! of integer tile products, so each row's work is shared:
//! - scores: the keys' rows are the A tiles as the cache holds them (16 positions x 64 values, no
//!   copy); each query head is rounded to 16 bits and split into a signed high and an unsigned low
//!   byte (`q = 256·hi + lo`), the B tiles, so `tdpbssd` + `tdpbsud` give `k·q` exactly in i32;
//! - values: each query's softmax weights (times the rows' scales) are rounded to 16 bits per block
//!   of 64 positions and split the same way (the A tiles), and the values are interleaved four
//!   positions at a time into the B layout (once per block and head, for all queries).
//!
//! The hardware prefetchers keep up with the rows: prefetching the next block in software measured
//! the same (`dsvl2 bench`, batch 8: 157-162 against 158-162 tokens/s, three interleaved pairs).
//!
//! Rounding: 16-bit queries and weights (relative error <= 2^-16 of the largest in a head or
//! block); the cache's own i8 rounding (2^-8) is far larger. All sums in i32 are exact.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use crate::attention::{AttentionShape, Partial, RowScales};

/// Fewest queries over a range that go through the tiles; fewer run one at a time. One query alone
/// is ~4x faster on the AVX-512 kernel (`kernel_bench attention`, 1039 positions hot: 99 against
/// 378-418 µs): the packing and per-block work here is paid once per range whatever the count.
pub(crate) const MIN_READERS: usize = 2;

/// Values per key and value head the tile layout is written for (DeepSeek-VL2 tiny's MHA).
const HEAD_DIM: usize = 128;

/// Whether [`attend_positions_many`] takes this shape.
pub(crate) fn supports(s: &AttentionShape) -> bool {
    s.key_dim == HEAD_DIM && s.value_dim == HEAD_DIM && s.heads / s.kv_heads <= 16
}

/// The partial softmax results of each query in `queries` (`[heads · 128]` each) over `positions` of
/// an i8 cache, as `attend_positions` gives them one query at a time (up to the rounding above).
///
/// # Safety
/// AMX-INT8 must be available (`amx::available`) and AVX-512 F/BW/VL detected; `s` must satisfy
/// [`supports`] and the cache slices hold `positions` (checked by the caller).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(crate) unsafe fn attend_positions_many(
    queries: &[&[f32]],
    keys: &[i8],
    values: &[i8],
    scales: RowScales,
    positions: Range<usize>,
    s: &AttentionShape,
) -> Vec<Partial> {
    // One column per (query, head of a key/value group); 16 columns per tile.
    let group = s.heads / s.kv_heads;
    let per_call = (16 / group).max(1);
    if queries.len() > per_call {
        return queries
            .chunks(per_call)
            .flat_map(|chunk| attend_positions_many(chunk, keys, values, scales, positions.clone(), s))
            .collect();
    }
    let cols = queries.len() * group;
    let n = positions.len();
    let padded = n.next_multiple_of(64);
    // Row (g · cols + c) of `scores` and `acc`: key/value head g, column c (query c / group, head
    // g · group + c % group). Scores at positions.start + i, zero-padded to a multiple of 64.
    let mut scores = vec![0f32; s.kv_heads * cols * padded];
    let mut acc = vec![0f32; s.kv_heads * cols * HEAD_DIM];
    // The tiles: 0 and 1 accumulate (high and low bytes), 2 and 3 are the A tiles, 4-7 the B tiles;
    // every one 16 rows x 64 bytes.
    super::amx::configure_tiles(&[(16, 64); 8]);
    let packed = pack_queries(queries, s, group);
    key_scores(keys, scales.keys, &positions, s, &packed, cols, padded, &mut scores);
    let mut partials: Vec<Partial> = queries
        .iter()
        .map(|_| Partial {
            max: vec![0.0; s.heads],
            sum: vec![0.0; s.heads],
            acc: vec![0.0; s.heads * HEAD_DIM],
        })
        .collect();
    for (row, scores) in scores.chunks_exact_mut(padded).enumerate() {
        let (max, sum) = crate::math::exp_shifted_in_place::<true>(&mut scores[..n]);
        let (g, c) = (row / cols, row % cols);
        let (query, head) = (c / group, g * group + c % group);
        partials[query].max[head] = max;
        partials[query].sum[head] = sum;
    }
    weighted_values(values, scales.values, &positions, s, cols, &scores, padded, &mut acc);
    asm!("tilerelease", options(nostack, nomem));
    for (row, acc) in acc.chunks_exact(HEAD_DIM).enumerate() {
        let (g, c) = (row / cols, row % cols);
        let (query, head) = (c / group, g * group + c % group);
        partials[query].acc[head * HEAD_DIM..][..HEAD_DIM].copy_from_slice(acc);
    }
    partials
}

/// B tiles of the queries: per key/value head `g`, four tiles of 16 rows x 64 bytes (`tiles[4g..]`:
/// high bytes of values 0-63, of 64-127, low bytes of 0-63, of 64-127), byte `4c + j` of row `r`
/// holding value `4r + j` of the half for column `c`; and each column's scale.
struct PackedQueries {
    tiles: Vec<[u8; 1024]>,
    /// `scale[g · 16 + c]`: the column's 16-bit step (`q ≈ step · (256·hi + lo)`).
    scale: Vec<f32>,
}

/// Rounds each column's head to 16 bits (nearest, ties to even) with a step of its largest magnitude
/// / 32767, and writes the high and low bytes of every group of four values as one 32-bit lane of a
/// tile row (one scatter of 16 lanes per column, half and byte). It runs once per range of a call:
/// one value at a time it took ~30% of the kernel; vectorized, eight readers over 1039 positions went
/// from 325-388 to 236-262 µs per call (`kernel_bench attention`, hot, 2 threads, Emerald Rapids).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_queries(queries: &[&[f32]], s: &AttentionShape, group: usize) -> PackedQueries {
    let mut tiles = vec![[0u8; 1024]; 4 * s.kv_heads];
    let mut scale = vec![0f32; 16 * s.kv_heads];
    // Lane r (values 4r..4r + 3 of a half) goes to row r: 16 lanes of 4 bytes further on.
    let row_starts = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(16),
    );
    for g in 0..s.kv_heads {
        for (q, query) in queries.iter().enumerate() {
            for j in 0..group {
                let (c, head) = (q * group + j, g * group + j);
                let x = query[head * HEAD_DIM..][..HEAD_DIM].as_ptr();
                let v: [__m512; HEAD_DIM / 16] = std::array::from_fn(|k| _mm512_loadu_ps(x.add(16 * k)));
                let max = _mm512_reduce_max_ps(
                    v.iter()
                        .fold(_mm512_setzero_ps(), |m, &v| _mm512_max_ps(m, _mm512_abs_ps(v))),
                );
                scale[g * 16 + c] = max / 32767.0;
                let inverse = _mm512_set1_ps(if max > 0.0 { 32767.0 / max } else { 0.0 });
                for half in 0..2 {
                    let q16: [__m512i; 4] =
                        std::array::from_fn(|k| _mm512_cvtps_epi32(_mm512_mul_ps(v[4 * half + k], inverse)));
                    // The 64 bytes of one half in value order: lane r holds values 4r..4r + 3.
                    let bytes = |f: &dyn Fn(__m512i) -> __m512i| {
                        let b = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(f(q16[0])));
                        let b = _mm512_inserti32x4::<1>(b, _mm512_cvtepi32_epi8(f(q16[1])));
                        let b = _mm512_inserti32x4::<2>(b, _mm512_cvtepi32_epi8(f(q16[2])));
                        _mm512_inserti32x4::<3>(b, _mm512_cvtepi32_epi8(f(q16[3])))
                    };
                    let high = bytes(&|q| _mm512_srai_epi32::<8>(q));
                    let low = bytes(&|q| q);
                    let column = |tile: &mut [u8; 1024]| tile.as_mut_ptr().add(4 * c) as *mut i32;
                    _mm512_i32scatter_epi32::<4>(column(&mut tiles[4 * g + half]), row_starts, high);
                    _mm512_i32scatter_epi32::<4>(column(&mut tiles[4 * g + 2 + half]), row_starts, low);
                }
            }
        }
    }
    PackedQueries { tiles, scale }
}

/// Each column's scaled scores (`(k · q) · key scale · s.scale`) at each position: `scores[(g ·
/// cols + c) · padded + i]` for position `positions.start + i`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn key_scores(
    keys: &[i8],
    key_scales: &[f32],
    positions: &Range<usize>,
    s: &AttentionShape,
    packed: &PackedQueries,
    cols: usize,
    padded: usize,
    scores: &mut [f32],
) {
    assert!(scores.len() >= s.kv_heads * cols * padded && positions.len() <= padded);
    let width = s.kv_heads * HEAD_DIM;
    // The last block's rows past the range, as zeros (a tile always loads 16 rows).
    let mut tail = vec![0i8; 16 * width];
    let mut hi = Tile([0; 256]);
    let mut lo = Tile([0; 256]);
    let n = positions.len();
    for block in (0..n).step_by(16) {
        let rows = (n - block).min(16);
        let first = positions.start + block;
        let (base, stride) = if rows == 16 {
            (keys.as_ptr().add(first * s.key_stride), s.key_stride)
        } else {
            for r in 0..rows {
                tail[r * width..][..width].copy_from_slice(&keys[(first + r) * s.key_stride..][..width]);
            }
            (tail.as_ptr(), width)
        };
        for g in 0..s.kv_heads {
            let b = &packed.tiles[4 * g..4 * g + 4];
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tileloadd tmm2, [{k} + {ks} * 1]",
                "tileloadd tmm3, [{k} + {ks} * 1 + 64]",
                "tileloadd tmm4, [{b0} + {bs} * 1]",
                "tileloadd tmm5, [{b1} + {bs} * 1]",
                "tileloadd tmm6, [{b2} + {bs} * 1]",
                "tileloadd tmm7, [{b3} + {bs} * 1]",
                "tdpbssd tmm0, tmm2, tmm4",
                "tdpbssd tmm0, tmm3, tmm5",
                "tdpbsud tmm1, tmm2, tmm6",
                "tdpbsud tmm1, tmm3, tmm7",
                "tilestored [{hi} + {bs} * 1], tmm0",
                "tilestored [{lo} + {bs} * 1], tmm1",
                k = in(reg) base.add(g * HEAD_DIM),
                ks = in(reg) stride,
                b0 = in(reg) b[0].as_ptr(),
                b1 = in(reg) b[1].as_ptr(),
                b2 = in(reg) b[2].as_ptr(),
                b3 = in(reg) b[3].as_ptr(),
                bs = in(reg) 64usize,
                hi = in(reg) hi.0.as_mut_ptr(),
                lo = in(reg) lo.0.as_mut_ptr(),
                options(nostack),
            );
            let step = _mm512_mul_ps(
                _mm512_loadu_ps(packed.scale.as_ptr().add(g * 16)),
                _mm512_set1_ps(s.scale),
            );
            // Row r: position r's scores for the 16 columns (zero past the range: zero keys, zero
            // scale); transposed, each column's 16 positions are one store. 16 scatters of `cols`
            // lanes per block took half of this function's time; with the transpose, eight readers
            // over 1039 positions take 209-231 instead of 234-262 µs per call (`kernel_bench
            // attention`, four interleaved pairs).
            let rows_out: [__m512; 16] = std::array::from_fn(|r| {
                let row_scale = if r < rows {
                    key_scales[(first + r) * s.kv_heads + g]
                } else {
                    0.0
                };
                _mm512_mul_ps(joined_row(&hi, &lo, r), _mm512_mul_ps(step, _mm512_set1_ps(row_scale)))
            });
            let head_scores = scores.as_mut_ptr().add(g * cols * padded + block);
            for (c, column) in transpose16(rows_out).iter().take(cols).enumerate() {
                _mm512_storeu_ps(head_scores.add(c * padded), *column);
            }
        }
    }
}

/// The transpose of a 16 x 16 matrix held as 16 rows: lane `j` of row `i` becomes lane `i` of row `j`
/// (pairs, then quads within 128-bit lanes, then the 128-bit lanes themselves).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // a[2i], a[2i + 1]: rows 2i and 2i + 1 interleaved, per 128-bit lane k: columns 4k, 4k + 1 and
    // 4k + 2, 4k + 3.
    let a: [__m512; 16] = std::array::from_fn(|k| {
        let (x, y) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    // b[4i + j], 128-bit lane k: column 4k + j of rows 4i..4i + 3.
    let b: [__m512; 16] = std::array::from_fn(|k| {
        let (i, j) = (k / 4, k % 4);
        let (x, y) = (
            _mm512_castps_pd(a[4 * i + j / 2]),
            _mm512_castps_pd(a[4 * i + 2 + j / 2]),
        );
        _mm512_castpd_ps(if j % 2 == 0 {
            _mm512_unpacklo_pd(x, y)
        } else {
            _mm512_unpackhi_pd(x, y)
        })
    });
    // Column 4k + j: 128-bit lane k of b[j], b[4 + j], b[8 + j], b[12 + j].
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let even_low = _mm512_shuffle_f32x4::<0x88>(b[j], b[4 + j]);
        let odd_low = _mm512_shuffle_f32x4::<0xDD>(b[j], b[4 + j]);
        let even_high = _mm512_shuffle_f32x4::<0x88>(b[8 + j], b[12 + j]);
        let odd_high = _mm512_shuffle_f32x4::<0xDD>(b[8 + j], b[12 + j]);
        out[j] = _mm512_shuffle_f32x4::<0x88>(even_low, even_high);
        out[8 + j] = _mm512_shuffle_f32x4::<0xDD>(even_low, even_high);
        out[4 + j] = _mm512_shuffle_f32x4::<0x88>(odd_low, odd_high);
        out[12 + j] = _mm512_shuffle_f32x4::<0xDD>(odd_low, odd_high);
    }
    out
}

/// One tile's i32 results, 16 rows of 16, as `tilestored` leaves them.
#[repr(C, align(64))]
struct Tile([i32; 256]);

/// Row `r` of the products with the high bytes times 256 plus those with the low bytes: the
/// products with the 16-bit values (exact in i32), as f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn joined_row(hi: &Tile, lo: &Tile, r: usize) -> __m512 {
    let hi = _mm512_load_si512(hi.0.as_ptr().add(16 * r) as *const __m512i);
    let lo = _mm512_load_si512(lo.0.as_ptr().add(16 * r) as *const __m512i);
    _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32::<8>(hi), lo))
}

/// `acc[(g · cols + c) · 128 + d] = Σ_i scores[(g · cols + c) · padded + i] · value scale · value d`
/// over the positions `positions.start + i`: each column's softmax weights times the values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn weighted_values(
    values: &[i8],
    value_scales: &[f32],
    positions: &Range<usize>,
    s: &AttentionShape,
    cols: usize,
    scores: &[f32],
    padded: usize,
    acc: &mut [f32],
) {
    let n = positions.len();
    assert!(scores.len() >= s.kv_heads * cols * padded && acc.len() >= s.kv_heads * cols * HEAD_DIM && n <= padded);
    let zero_row = [0i8; HEAD_DIM];
    // Each head's row scales over the range, zero-padded (so padding weighs nothing).
    let mut row_scales = vec![0f32; s.kv_heads * padded];
    for i in 0..n {
        for g in 0..s.kv_heads {
            row_scales[g * padded + i] = value_scales[(positions.start + i) * s.kv_heads + g];
        }
    }
    // A tiles: high and low bytes of the 16-bit weights, column c's 64 positions in row c.
    let mut a_hi = Bytes([0; 1024]);
    let mut a_lo = Bytes([0; 1024]);
    // B tiles: 8 of 16 values each; row r holds positions 4r..4r+3 interleaved per value.
    let mut b = vec![Bytes([0; 1024]); HEAD_DIM / 16];
    let mut steps = [0f32; 16];
    let mut hi = Tile([0; 256]);
    let mut lo = Tile([0; 256]);
    for block in (0..n).step_by(64) {
        let first = positions.start + block;
        let rows = (n - block).min(64);
        for g in 0..s.kv_heads {
            // The block's weights times the rows' scales, rounded to 16 bits per column.
            let scale = row_scales.as_ptr().add(g * padded + block);
            for (c, step) in steps[..cols].iter_mut().enumerate() {
                let w = scores.as_ptr().add((g * cols + c) * padded + block);
                let x: [__m512; 4] = std::array::from_fn(|k| {
                    _mm512_mul_ps(_mm512_loadu_ps(w.add(16 * k)), _mm512_loadu_ps(scale.add(16 * k)))
                });
                let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])));
                *step = max / 65535.0;
                let inverse = _mm512_set1_ps(if max > 0.0 { 65535.0 / max } else { 0.0 });
                for (k, &x) in x.iter().enumerate() {
                    // Weights are >= 0: round to nearest, then the high and the low byte.
                    let w16 = _mm512_cvtps_epu32(_mm512_mul_ps(x, inverse));
                    let at = c * 64 + 16 * k;
                    _mm_storeu_si128(
                        a_hi.0.as_mut_ptr().add(at) as *mut __m128i,
                        _mm512_cvtepi32_epi8(_mm512_srli_epi32::<8>(w16)),
                    );
                    _mm_storeu_si128(
                        a_lo.0.as_mut_ptr().add(at) as *mut __m128i,
                        _mm512_cvtepi32_epi8(_mm512_and_si512(w16, _mm512_set1_epi32(0xff))),
                    );
                }
            }
            interleave_values(values, first, rows, g, s, &zero_row, &mut b);
            let head_acc = acc.as_mut_ptr().add(g * cols * HEAD_DIM);
            for (part, tile) in b.iter().enumerate() {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tileloadd tmm2, [{ah} + {st} * 1]",
                    "tileloadd tmm3, [{al} + {st} * 1]",
                    "tileloadd tmm4, [{b} + {st} * 1]",
                    "tdpbusd tmm0, tmm2, tmm4",
                    "tdpbusd tmm1, tmm3, tmm4",
                    "tilestored [{hi} + {st} * 1], tmm0",
                    "tilestored [{lo} + {st} * 1], tmm1",
                    ah = in(reg) a_hi.0.as_ptr(),
                    al = in(reg) a_lo.0.as_ptr(),
                    b = in(reg) tile.0.as_ptr(),
                    st = in(reg) 64usize,
                    hi = in(reg) hi.0.as_mut_ptr(),
                    lo = in(reg) lo.0.as_mut_ptr(),
                    options(nostack),
                );
                for (c, &step) in steps[..cols].iter().enumerate() {
                    let out = head_acc.add(c * HEAD_DIM + part * 16);
                    let sum = _mm512_fmadd_ps(joined_row(&hi, &lo, c), _mm512_set1_ps(step), _mm512_loadu_ps(out));
                    _mm512_storeu_ps(out, sum);
                }
            }
        }
    }
}

/// Tile-sized bytes, aligned as `tileloadd` likes them.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bytes([u8; 1024]);

/// The B tiles of head `g`'s values at positions `first..first + rows` (rows past those are zeros):
/// tile `t` row `r`, bytes `4d..4d + 4` = value `16t + d` at positions `4r..4r + 4` of the block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn interleave_values(
    values: &[i8],
    first: usize,
    rows: usize,
    g: usize,
    s: &AttentionShape,
    zero_row: &[i8; HEAD_DIM],
    b: &mut [Bytes],
) {
    let row = |i: usize| -> *const i8 {
        if i < rows {
            values.as_ptr().add((first + i) * s.value_stride + g * HEAD_DIM)
        } else {
            zero_row.as_ptr()
        }
    };
    for r in 0..16 {
        let p = [row(4 * r), row(4 * r + 1), row(4 * r + 2), row(4 * r + 3)];
        for (t, tile) in b.iter_mut().enumerate() {
            let load = |q: *const i8| _mm_loadu_si128(q.add(16 * t) as *const __m128i);
            let (v0, v1, v2, v3) = (load(p[0]), load(p[1]), load(p[2]), load(p[3]));
            let (lo01, hi01) = (_mm_unpacklo_epi8(v0, v1), _mm_unpackhi_epi8(v0, v1));
            let (lo23, hi23) = (_mm_unpacklo_epi8(v2, v3), _mm_unpackhi_epi8(v2, v3));
            let out = tile.0.as_mut_ptr().add(r * 64) as *mut __m128i;
            _mm_storeu_si128(out, _mm_unpacklo_epi16(lo01, lo23));
            _mm_storeu_si128(out.add(1), _mm_unpackhi_epi16(lo01, lo23));
            _mm_storeu_si128(out.add(2), _mm_unpacklo_epi16(hi01, hi23));
            _mm_storeu_si128(out.add(3), _mm_unpackhi_epi16(hi01, hi23));
        }
    }
}
